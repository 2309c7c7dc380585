"""The ``pnc`` command line. Thin: parse arguments, call one function, turn PncError into exit 1.

Importing this module must stay cheap (no torch, no mlflow): ``pnc --help`` and
``pnc validate`` answer in well under a second or two.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .errors import PncError

EPILOG = """examples:
  pnc validate specs/*.yaml
  pnc run specs/digits_depth.yaml --set train.epochs=1
  pnc plan specs/digits_noise.yaml --json
  pnc report specs/digits_depth.yaml
  pnc ui --port 5000
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 1 like every other bad input (argparse's own default is 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pnc",
        description="Progressive neural collapse, measured layer by layer: specs -> DVC -> Accelerate -> MLflow -> Altair.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"pnc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    v = sub.add_parser("validate", help="check study specs; report every problem as FILE:LINE:COL: key: message")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field (value parsed as YAML) before validating")

    s = sub.add_parser("schema", help="print the JSON Schema of study specs")
    s.add_argument("--write", action="store_true", help="write it to pnc/schema/study.schema.json")

    for name, helptext in (("plan", "list a study's cells with their ids"), ("run", "run a study (or one cell) outside DVC")):
        r = sub.add_parser(name, help=helptext)
        r.add_argument("spec", metavar="SPEC")
        r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec field, value parsed as YAML: --set train.epochs=1 --set 'models=[resnet8]'")
        if name == "plan":
            r.add_argument("--json", action="store_true", help="machine-readable output (cells only, unless --taps)")
            r.add_argument("--taps", action="store_true", help="with --json: also each model's taps (text output has them)")
        else:
            r.add_argument("--cell", action="append", default=[], metavar="ID", help="run only this cell (id or name; repeatable)")
            r.add_argument("--force", action="store_true", help="re-run cells that already finished")
            r.add_argument("--no-progress", action="store_true", help="no progress bars")
            r.add_argument("--results", metavar="PATH", help="also write a JSON summary of the cells (the DVC stage output)")
            r.add_argument("--metrics", metavar="PATH", help="also write the study's headline numbers as flat JSON (DVC metrics)")
            r.add_argument("--curves", metavar="PATH", help="also write each cell's CDNV per layer as CSV (DVC plots)")

    rep = sub.add_parser("report", help="draw a study's figures from MLflow into reports/<study>/")
    rep.add_argument("specs", nargs="*", metavar="SPEC")
    rep.add_argument("--out", default="reports", help="reports folder (default: reports)")
    rep.add_argument("--index", action="store_true", help="(re)write reports/index.html linking every study's report")
    rep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="the overrides the study was run with (`pnc run SPEC --set ...`): report exactly those cells")

    d = sub.add_parser("derive", help="materialise the derived (noisy/corrupted) splits a study needs (a DVC stage)")
    d.add_argument("spec", metavar="SPEC")
    d.add_argument("--out", default="data/derived", help="folder of derived splits (default: data/derived)")

    e = sub.add_parser("embed", help="generate an embedded dataset into data/embedded/<name> (a DVC stage)")
    e.add_argument("dataset", choices=["digits", "digits_domains"])
    e.add_argument("--out", default="data/embedded", help="folder (default: data/embedded)")

    u = sub.add_parser("ui", help="open the MLflow UI on the project's store")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)

    cmp_ = sub.add_parser("compare", help="overlay a per-layer metric of several studies on relative depth")
    cmp_.add_argument("studies", nargs="+", metavar="STUDY", help="spec files or study names")
    cmp_.add_argument("--metric", help="metric key (default: the study's CDNV curve)")
    cmp_.add_argument("--out", default="reports", help="reports folder (default: reports)")

    est = sub.add_parser("estimate-noise", help="estimate the training-label noise of a run from its CDNV profile")
    est.add_argument("run_id", metavar="RUN_ID")
    est.add_argument("--calibration", metavar="STUDY", help="noise study whose calibration to use (default: all found)")
    est.add_argument("--json", action="store_true")

    lin = sub.add_parser("lineage", help="trace an MLflow run back to the raw data; check nothing drifted")
    lin.add_argument("run_id", metavar="RUN_ID")
    lin.add_argument("--json", action="store_true")
    return p


def _cmd_validate(args: argparse.Namespace) -> int:
    from .errors import SpecError
    from .spec import load_spec

    bad = 0
    for f in args.files:
        try:
            spec = load_spec(f, args.overrides)
        except SpecError as e:
            bad += 1
            print(str(e), file=sys.stderr)
        except PncError as e:
            bad += 1
            print(f"{f}:1:1: {e}", file=sys.stderr)
        else:
            print(f"{f}: ok ({spec.kind} '{spec.name}', {len(spec.models)} model(s))")
    if len(args.files) > 1:
        print(f"{len(args.files) - bad} valid, {bad} invalid", file=sys.stderr if bad else sys.stdout)
    return 1 if bad else 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from .spec import SCHEMA_PATH, json_schema_text

    text = json_schema_text()
    if args.write:
        SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
        SCHEMA_PATH.write_text(text)
        print(f"wrote {SCHEMA_PATH}")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .cells import expand
    from .spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    cells = expand(spec)
    if args.json:
        print(json.dumps({"study": spec.name, "kind": spec.kind, "cells": [c.as_dict() for c in cells]}, indent=2))
    else:
        print(f"{spec.name} ({spec.kind}): {len(cells)} cell(s)")
        for c in cells:
            print(f"  {c.id}  {c.name}")
    if args.taps or not args.json:
        from .engine import planned_taps  # builds each model on the meta device: torch, no weights, no data

        taps = planned_taps(spec, cells)
        if args.json:
            print(json.dumps({m: t if isinstance(t, str) else [{"name": n, "type": ty, "shape": list(s)} for n, ty, s in t]
                              for m, t in taps.items()}, indent=2))
        else:
            for model, t in taps.items():
                print(f"{model}: " + (t if isinstance(t, str) else f"{len(t)} taps (measure.layers: "
                                      f"{spec.measure.layers if isinstance(spec.measure.layers, str) else 'custom'})"))
                for n, ty, s in [] if isinstance(t, str) else t:
                    print(f"  {n:<28} {ty:<22} {' x '.join(map(str, s[1:]))}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .cells import expand, find_cell
    from .spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    cells = expand(spec)
    if args.cell:
        cells = [find_cell(cells, key) for key in args.cell]
    from .engine import run_study  # heavy imports only now
    from .results import DvcFiles

    dvc_files = DvcFiles(Path(args.metrics) if args.metrics else None, Path(args.curves) if args.curves else None)
    return run_study(spec, cells, spec_path=args.spec, force=args.force, progress=not args.no_progress,
                     results_path=args.results, overrides=args.overrides, dvc_files=dvc_files)


def _cmd_report(args: argparse.Namespace) -> int:
    from .spec import load_spec

    if not args.specs and not args.index:
        raise PncError("give one or more study specs, or --index")
    from .figures import render_index
    from .report import render_study

    for f in args.specs:
        spec = load_spec(f, args.overrides)
        out = render_study(spec, Path(args.out))
        print(f"{spec.name}: report written to {out}")
    print(f"index: {render_index(Path(args.out))}")  # given specs or --index (checked above)
    return 0


def _cmd_derive(args: argparse.Namespace) -> int:
    from .registry import KINDS
    from .spec import load_spec

    spec = load_spec(args.spec)
    for path in KINDS.get(spec.kind).derive(spec, Path(args.out)):
        print(path)
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from .data.registry import materialise_embedded

    print(materialise_embedded(args.dataset, Path(args.out)))
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from .tracking import tracking_uri, ui_links

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        print(f"MLFLOW_TRACKING_URI points at a tracking server: open {uri} in a browser (its UI is served there).")
        return 0
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {base} (store: {uri}); Ctrl-C to stop")
    for name, url in ui_links(base):
        print(f"  {name}: {url}")
    sys.stdout.flush()
    os.execv(sys.executable, cmd)
    return 0  # pragma: no cover


def _cmd_compare(args: argparse.Namespace) -> int:
    from .figures import render_index
    from .report import render_compare

    out = render_compare(args.studies, Path(args.out), args.metric)
    render_index(Path(args.out))
    print(f"comparison written to {out}")
    return 0


def _cmd_estimate_noise(args: argparse.Namespace) -> int:
    from .kinds.noise import estimate_noise_for_run

    rows = estimate_noise_for_run(args.run_id, args.calibration, echo=False)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['calibration']}: {r['kind']} noise level ~ {r['estimate']:g} (map fitted on levels "
              f"{', '.join(f'{x:g}' for x in r['levels'])}; leave-one-level-out error {r['loo_mae']:.3g})")
        for w in r.get("warnings") or []:
            print(f"  warning: {w}")
    return 0


def _cmd_lineage(args: argparse.Namespace) -> int:
    from .lineage import lineage

    return lineage(args.run_id, as_json=args.json)


COMMANDS = {name: globals()["_cmd_" + name.replace("-", "_")] for name in (
    "validate", "schema", "plan", "run", "report", "derive", "embed", "ui", "lineage", "compare", "estimate-noise")}


def _terminated(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():  # SIGTERM cleans up like Ctrl-C, in every command
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return COMMANDS[args.command](args)
    except PncError as e:
        print(f"error: {e}" if "\n" not in str(e) and ":" not in str(e).split(" ")[0] else str(e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `pnc schema | head`
        return 0
    except Exception as e:  # noqa: BLE001 - a bug: say so in one line, keep the traceback in a file
        import traceback

        log = Path(".pnc") / "last-error.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc())
            where = f"; traceback in {log}"
        except OSError:
            where = ""
        print(f"pnc: internal error: {type(e).__name__}: {e}{where}. Please report it.", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
