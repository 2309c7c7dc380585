"""The spec language: shipped specs validate; each kind of bad spec gives its message at its line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pnc import catalog
from pnc.cells import expand
from pnc.errors import PncError, SpecError
from pnc.kinds.noise import noise_settings
from pnc.spec import SCHEMA_LINE_PREFIX, SCHEMA_PATH, json_schema_text, load_spec, spec_digest

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))

GOOD = """\
kind: depth_sweep
name: tiny
dataset:
  name: digits
  image_size: 16
models: [resnet8, resnet14]
train:
  epochs: 2
"""


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def problems(path: Path, overrides=None) -> list[str]:
    with pytest.raises(SpecError) as e:
        load_spec(path, overrides)
    return [str(p).replace(f"{path.parent}/", "") for p in e.value.problems]


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_shipped_spec_validates(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name == path.stem, "a spec's name is its file name"
    assert path.read_text().splitlines()[0] == f"{SCHEMA_LINE_PREFIX}../pnc/schema/study.schema.json"
    assert expand(spec), "every study has cells"


def test_paper_studies_are_all_shipped() -> None:
    names = {p.stem for p in SPECS}
    for required in ["cifar10_depth", "cifar100_depth", "imagenet_depth", "cifar10_swin", "cifar100_swin", "mini_imagenet_swin",
                     "cifar10n_resnet", "cifar10n_swin", "cifar10_random_labels", "cifar10c_corruption", "office_home",
                     "digits_depth", "digits_noise", "digits_transfer"]:
        assert required in names
    depth = load_spec(ROOT / "specs" / "cifar10_depth.yaml")
    assert [m.name for m in depth.models] == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    swin = load_spec(ROOT / "specs" / "mini_imagenet_swin.yaml")
    assert len(swin.models) == 4 and all(m.resolved_source == "timm" for m in swin.models)
    n = load_spec(ROOT / "specs" / "cifar10n_resnet.yaml")
    assert [s.tag for s in noise_settings(n)] == ["clean", "human:aggre", "human:random1", "human:worse"]
    c = load_spec(ROOT / "specs" / "cifar10c_corruption.yaml")
    assert [s.tag for s in noise_settings(c)] == ["clean"] + [f"{k}:{s}" for k in ("gaussian_noise", "speckle_noise") for s in (1, 2, 3)]


def test_committed_schema_is_current() -> None:
    assert SCHEMA_PATH.read_text() == json_schema_text(), "stale schema: run `pnc schema --write`"
    schema = json.loads(SCHEMA_PATH.read_text())
    assert {"DepthSweepSpec", "NoiseSweepSpec", "DomainTransferSpec"} <= set(schema["$defs"])


def test_defaults_are_filled_once(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.train.optimizer.name == "sgd" and spec.train.batch_size == 128
    assert spec.measure.layers == "blocks" and spec.probe.kind == "ridge"
    assert spec.dataset.size == 16 and spec.experiment == "tiny"


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD.replace("  image_size: 16", "  image_sise: 16"), "s.yaml:5:3: dataset.image_sise: unknown key 'image_sise'. Did you mean 'image_size'?"),
        (GOOD.replace("epochs: 2", "epochs: 0"), "s.yaml:8:11: train.epochs: Input should be greater than or equal to 1"),
        (GOOD.replace("epochs: 2", "epochs: two"), "s.yaml:8:11: train.epochs: Input should be a valid integer"),
        (GOOD.replace("resnet14", "resnt14"), "s.yaml:6:19: models[1].name: unknown model 'resnt14'. Did you mean 'resnet14'"),
        (GOOD.replace("name: digits", "name: digitz"), "s.yaml:4:9: dataset.name: unknown dataset 'digitz'. Did you mean 'digits'"),
        (GOOD.replace("kind: depth_sweep", "kind: depth_swep"), "s.yaml:1:1: unknown kind 'depth_swep'. Did you mean 'depth_sweep'?"),
        (GOOD.replace("[resnet8, resnet14]", "[]"), "s.yaml:6:1: models: List should have at least 1 item"),
        (GOOD.replace("[resnet8, resnet14]", "[resnet8, resnet8]"), "models: duplicate models: resnet8"),
        (GOOD.replace("name: tiny", "name: Tiny Study"), "s.yaml:2:7: name: String should match pattern"),
        (GOOD + "measure: {reduction: project:0}\n", "measure.reduction: String should match pattern"),
        (GOOD + "measure: {layers: []}\n", "measure.layers: Value error, layer pattern list is empty") ,
        (GOOD + "measure: {layers: blockz}\n", "s.yaml:9:19: measure.layers: Input should be 'blocks' or 'stages' (got 'blockz')"),
        (GOOD + "measure: {layers: 5}\n", "s.yaml:9:19: measure.layers: expected 'blocks', 'stages', a list of module name patterns, or a mapping"),
        (GOOD + "measure: {layers: {}}\n", "measure.layers: Value error, give at least one module class under 'types'"),
        (GOOD + "measure: {layers: {typs: [BasicBlock]}}\n", "s.yaml:9:20: measure.layers.typs: unknown key 'typs'. Did you mean 'types'?"),
        (GOOD + "measure: {layers: {names: [a, 3]}}\n", "s.yaml:9:31: measure.layers.names[1]: Input should be a valid string"),
        (GOOD + "probe: {samples_per_class: 5}\n", "probe.samples_per_class: only a domain_transfer study"),
        (GOOD.replace("name: digits", "name: office_home"), "dataset: office_home has several domains"),
    ],
)
def test_bad_spec_messages(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(write(tmp_path, text))
    assert any(expected.replace("Value error, ", "") in p for p in found), found


NOISE = """\
kind: noise_sweep
name: n
dataset: {name: digits}
models: [resnet8]
noise:
  label:
    - {kind: symmetric, rates: [0.0, 1.5]}
    - {kind: human, label_sets: [aggre]}
  input:
    - {corruption: gausian_noise, severities: [0, 9]}
"""


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    found = problems(write(tmp_path, NOISE))
    assert any(p.startswith("s.yaml:7:") and "rates must lie in [0, 1]; got 1.5" in p for p in found), found
    assert any(p.startswith("s.yaml:10:") and "Did you mean 'gaussian_noise'" in p for p in found), found
    assert any("severities must lie in 0..5" in p for p in found), found


def test_cross_field_problems_come_with_field_problems(tmp_path: Path) -> None:
    text = NOISE.replace("name: digits", "name: cifar10").replace("[aggre]", "[aggre, worst]")
    found = problems(write(tmp_path, text))
    assert any("rates must lie in [0, 1]; got 1.5" in p for p in found), found
    assert any(p.startswith("s.yaml:8:") and "no human label set 'worst'. Did you mean 'worse'?" in p for p in found), found
    bad_models = TRANSFER.replace("[resnet50]", "[resnet5000]")
    found = problems(write(tmp_path, bad_models))
    assert any("unknown model 'resnet5000'" in p for p in found) and any("Did you mean 'Product'" in p for p in found), found



def test_an_invalid_dataset_block_still_checks_domains_and_label_sets(tmp_path: Path) -> None:
    """A typo elsewhere in the dataset block must not hide that a domain or a label set does not exist."""
    found = problems(write(tmp_path, TRANSFER.replace("{name: office_home}", "{name: office_home, size: 32}")))
    assert found == ["s.yaml:3:30: dataset.size: unknown key 'size'. Available: domain, image_size, name, root, splits, test_split, train_split.",
                     "s.yaml:7:13: transfer.targets[0]: unknown domain 'Prodcut' of office_home. Did you mean 'Product'? "
                     "Available: Art, Clipart, Product, Real_World."], found
    noisy = NOISE.replace("{name: digits}", "{name: cifar10, image_size: big}").replace("[aggre]", "[aggre, worst]")
    found = problems(write(tmp_path, noisy))
    assert any("dataset.image_size" in p for p in found), found
    assert any("no human label set 'worst'. Did you mean 'worse'?" in p for p in found), found


def test_duplicate_models_are_reported_with_unknown_ones(tmp_path: Path) -> None:
    text = GOOD.replace("[resnet8, resnet14]", "[resnet8, {name: resnet8}, resnet99x]")
    found = problems(write(tmp_path, text))
    assert "s.yaml:6:1: models: duplicate models: resnet8" in found, found
    assert any(p.startswith("s.yaml:6:") and "unknown model 'resnet99x'" in p for p in found), found
    assert problems(write(tmp_path, GOOD.replace("resnet14]", "resnet8]"))) == ["s.yaml:6:1: models: duplicate models: resnet8"]


def test_cross_field_rules(tmp_path: Path) -> None:
    text = NOISE.replace("1.5", "0.5").replace("gausian_noise", "gaussian_noise").replace("9]", "3]")
    found = problems(write(tmp_path, text))
    assert any("noise.label[1].kind: label noise 'human' exists only for cifar10, cifar100, not digits" in p for p in found), found
    cifar = text.replace("name: digits", "name: cifar10").replace("[aggre]", "[aggre, worst]")
    found = problems(write(tmp_path, cifar))
    assert any(p.startswith("s.yaml:8:") and "no human label set 'worst'. Did you mean 'worse'?" in p for p in found), found


TRANSFER = """\
kind: domain_transfer
name: oh
dataset: {name: office_home}
models: [resnet50]
transfer:
  sources: [Art, Clipart]
  targets: [Prodcut, Real_World]
probe: {samples_per_class: 10}
"""


def test_unknown_domain_is_reported_with_an_empty_domain_list(tmp_path: Path) -> None:
    text = TRANSFER.replace("[Art, Clipart]", "[foo]").replace("[Prodcut, Real_World]", "[]")
    found = problems(write(tmp_path, text))
    assert any(p.startswith("s.yaml:7:") and "transfer.targets: List should have at least 1 item" in p for p in found), found
    assert any(p.startswith("s.yaml:6:13: transfer.sources[0]: unknown domain 'foo' of office_home.") for p in found), found
    dup = TRANSFER.replace("[Art, Clipart]", "[Art, Art]")  # a duplicate source hides no unknown target
    found = problems(write(tmp_path, dup))
    assert any("transfer.sources: duplicate entries: Art" in p for p in found), found
    assert any("transfer.targets[0]: unknown domain 'Prodcut'" in p for p in found), found


def test_unknown_label_set_is_reported_with_a_duplicate_one(tmp_path: Path) -> None:
    text = NOISE.replace("name: digits", "name: cifar10").replace("[aggre]", "[aggre, worst, aggre]")
    found = problems(write(tmp_path, text))
    assert any("noise.label[1].label_sets: duplicate entries: aggre" in p for p in found), found
    assert any(p.startswith("s.yaml:8:") and "noise.label[1].label_sets[1]: cifar10 has no human label set 'worst'. "
               "Did you mean 'worse'?" in p for p in found), found


def test_transfer_domain_did_you_mean(tmp_path: Path) -> None:
    found = problems(write(tmp_path, TRANSFER))
    assert found == ["s.yaml:7:13: transfer.targets[0]: unknown domain 'Prodcut' of office_home. Did you mean 'Product'? "
                     "Available: Art, Clipart, Product, Real_World."]


@pytest.mark.parametrize("content, expected", [
    ("", "empty spec"),
    ("- a\n- b\n", "must be a mapping"),
    ("kind: [\n", "malformed YAML"),
    ("kind: depth_sweep\nkind: noise_sweep\n", "malformed YAML"),
    ("\tkind: x\n", "malformed YAML"),
    ("name: x\n", "missing key 'kind'"),
])
def test_malformed_documents(tmp_path: Path, content: str, expected: str) -> None:
    found = problems(write(tmp_path, content))
    assert len(found) == 1 and expected in found[0] and found[0].startswith("s.yaml:"), found


def test_directory_and_missing_file(tmp_path: Path) -> None:
    assert "is a directory" in problems(tmp_path)[0]
    assert "no such file" in problems(tmp_path / "nope.yaml")[0]


def test_overrides_parse_yaml_and_name_themselves(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    spec = load_spec(path, ["train.epochs=1", "models=[resnet8]", "train.optimizer.lr=0.01"])
    assert spec.train.epochs == 1 and [m.name for m in spec.models] == ["resnet8"] and spec.train.optimizer.lr == 0.01
    found = problems(path, ["train.epochs=abc"])
    assert found == ["s.yaml: --set train.epochs=abc: train.epochs: Input should be a valid integer (got 'abc')"]


TOP_KEYS = "Available: dataset, description, kind, measure, models, name, probe, tracking, train."


@pytest.mark.parametrize("override, expected", [
    ("foo.bar=1", f"s.yaml: --set foo.bar=1: foo: unknown key 'foo'. {TOP_KEYS}"),
    ("noise.seed=1", f"s.yaml: --set noise.seed=1: noise: unknown key 'noise'. {TOP_KEYS}"),
    ("train.foo.bar=1", "s.yaml: --set train.foo.bar=1: train.foo: unknown key 'foo'."),
    ("dataset.extra.deep.x=1", "s.yaml: --set dataset.extra.deep.x=1: dataset.extra: unknown key 'extra'."),
])
def test_overrides_that_create_mappings_are_reported_as_the_override(tmp_path: Path, override: str, expected: str) -> None:
    """Problems at a mapping an override created have no position in the file: they are the override's."""
    found = problems(write(tmp_path, GOOD), [override])
    assert len(found) == 1 and found[0].startswith(expected), found


@pytest.mark.parametrize("key", ["a..b", ".x", "x.", "train..epochs", "."])
def test_override_keys_with_empty_segments_are_rejected(tmp_path: Path, key: str) -> None:
    with pytest.raises(PncError) as e:
        load_spec(write(tmp_path, GOOD), [f"{key}=1"])
    assert str(e.value) == f"--set {key}=1: empty key segment; expected key.path=value, e.g. train.epochs=1"


def test_overrides_on_several_files_report_every_file(tmp_path: Path) -> None:
    a, b = write(tmp_path, GOOD, "a.yaml"), write(tmp_path, NOISE, "b.yaml")
    for override, expect in [("foo.bar=1", "--set foo.bar=1: foo: unknown key 'foo'"),
                             ("a..b=1", "--set a..b=1: empty key segment"),
                             ("noise.seed=1", None),
                             ("train.epochs=abc", "--set train.epochs=abc: train.epochs: Input should be a valid integer")]:
        r = subprocess.run([sys.executable, "-m", "pnc.cli", "validate", str(a), str(b), "--set", override],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "0 valid, 2 invalid" in r.stderr or (override == "noise.seed=1" and "1 valid, 1 invalid" in r.stderr), r.stderr
        if expect is None:  # depth_sweep has no noise block; the noise_sweep b.yaml is still checked (its own problems)
            assert f"{a}: --set noise.seed=1: noise: unknown key 'noise'" in r.stderr, r.stderr
            continue
        for f in (a, b):
            assert any(line.startswith(f"{f}") and expect in line for line in r.stderr.splitlines()), (f, r.stderr)


def test_cells_and_ids_are_stable(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    cells = expand(spec)
    assert [c.name for c in cells] == ["tiny@model=resnet8", "tiny@model=resnet14"]
    assert [c.id for c in cells] == [c.id for c in expand(load_spec(write(tmp_path, GOOD)))]
    # changing one model's options changes that cell only; changing the recipe changes all
    other = expand(load_spec(write(tmp_path, GOOD.replace("resnet14]", "{name: resnet14, source: pnc}]"))))
    assert other[0].id == cells[0].id and other[1].id != cells[1].id
    longer = expand(load_spec(write(tmp_path, GOOD.replace("epochs: 2", "epochs: 3"))))
    assert all(a.id != b.id for a, b in zip(cells, longer))
    assert spec_digest(spec) != spec_digest(load_spec(write(tmp_path, GOOD.replace("epochs: 2", "epochs: 3"))))


def test_noise_cells_share_one_clean_cell() -> None:
    spec = load_spec(ROOT / "specs" / "digits_noise.yaml")
    tags = [s.tag for s in noise_settings(spec)]
    assert tags[0] == "clean" and tags.count("clean") == 1
    assert len(expand(spec)) == len(spec.models) * len(tags)


def test_cli_exit_codes_and_no_traceback(tmp_path: Path) -> None:
    bad = write(tmp_path, GOOD.replace("epochs: 2", "epochs: -3"))
    for args in (["validate", str(bad)], ["run", str(bad)], ["plan", str(bad)], ["validate", str(tmp_path / "missing.yaml")]):
        r = subprocess.run([sys.executable, "-m", "pnc.cli", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and ":" in r.stderr
    ok = subprocess.run([sys.executable, "-m", "pnc.cli", "validate", *map(str, SPECS)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    # command-line misuse is bad input too: exit 1 (not argparse's 2), the usage, and where to look
    for args in (["validate"], ["ui", "--port", "abc"], ["nope"], ["run", str(bad), "--no-such-flag"]):
        r = subprocess.run([sys.executable, "-m", "pnc.cli", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "usage: pnc" in r.stderr and "--help" in r.stderr, (args, r.stderr)


def test_help_and_validate_do_not_import_torch_or_mlflow() -> None:
    code = ("import sys; from pnc.cli import main; import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    main(['validate', {str(SPECS[0])!r}])\n"
            "bad = [m for m in ('torch', 'mlflow', 'timm', 'accelerate', 'altair') if m in sys.modules]\n"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_catalog_model_families() -> None:
    assert catalog.model_source("resnet20") == "pnc"
    assert catalog.model_source("resnet50") == "torchvision"
    assert catalog.model_source("swin_tiny_patch4_window7_224") == "timm"
    assert catalog.cifar_resnet_depth("cifar_resnet26") == 26 and catalog.cifar_resnet_depth("cifar_resnet27") is None


def test_booleans_and_quoted_numbers_are_not_numbers(tmp_path: Path) -> None:
    """Found by the fuzz test's JSON Schema oracle: pydantic's lax mode read `seed: true` as seed 1 and `epochs: '3'`
    as 3, where the schema (and a reader) sees a boolean and a string. The spec blocks validate strictly; an integer
    still serves where a number is asked for (as in JSON Schema)."""
    path = write(tmp_path, GOOD)
    assert sorted(problems(path, ["train.seed=true", "train.epochs='3'"])) == [
        "s.yaml: --set train.epochs='3': train.epochs: Input should be a valid integer (got '3')",
        "s.yaml: --set train.seed=true: train.seed: Input should be a valid integer (got True)"]
    assert load_spec(path, ["train.optimizer.lr=1"]).train.optimizer.lr == 1.0
