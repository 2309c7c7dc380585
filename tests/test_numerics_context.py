"""Every run records the hardware and numerics context its numbers depend on (README 'Reproducibility')."""
from __future__ import annotations

from pathlib import Path

import torch

from pnc import tracking
from pnc.engine import run_tags
from pnc.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def test_numerics_context_reports_this_process() -> None:
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.set_num_threads(3)
        torch.use_deterministic_algorithms(True)
        ctx = tracking.numerics_context()
        assert ctx["pnc.threads"] == "3" and ctx["pnc.deterministic"] == "true"
        torch.use_deterministic_algorithms(False)
        assert tracking.numerics_context()["pnc.deterministic"] == "false"
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    assert ctx["pnc.torch"] == torch.__version__
    if torch.cuda.is_available():
        assert ctx["pnc.gpu"] == torch.cuda.get_device_name(0) and ctx["pnc.cuda"] == torch.version.cuda
        assert ctx["pnc.cudnn"] == str(torch.backends.cudnn.version())
    else:
        assert ctx["pnc.gpu"] == ctx["pnc.cuda"] == ctx["pnc.cudnn"] == "none"
    assert ctx["pnc.cpu"].strip(), "a CPU model (or at least the architecture)"
    if Path("/proc/cpuinfo").exists():
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
        assert not models or ctx["pnc.cpu"] == models[0]


def test_every_run_of_a_study_carries_the_context() -> None:
    tags = run_tags(load_spec(ROOT / "specs" / "digits_depth.yaml"), "specs/digits_depth.yaml", None)
    assert {k: tags[k] for k in tracking.numerics_context()} == tracking.numerics_context()
