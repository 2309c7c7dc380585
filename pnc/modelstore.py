"""Networks stored in MLflow so that loading them runs no stored code.

A logged network is two files: ``weights.safetensors`` (tensors only; reading it cannot run code) and
``recipe.json``, what pnc needs to rebuild the architecture on the loading side:

- ``{"builder": "catalog", "name": "resnet8", "num_classes": 10, "in_chans": 1, "image_size": 8, ...}``: the
  arguments of :func:`pnc.models.build_model`, which records them on every network it builds;
- ``{"builder": "factory", "factory": "path/file.py:fn", "source_sha256": "...", "kwargs": {...}}``: the spec's
  factory reference; the loading side must have that source file with the recorded digest (pnc runs only code
  that is on its own disk and matches, never code from the store).

Both files sit in an MLflow logged model (``python_function`` flavor, ``loader_module: pnc.modelstore``), so
the model is listed in the MLflow UI under its run and in the registry, and ``mlflow.pyfunc.load_model`` loads
it through this module. :func:`register` registers it (tags, aliases ``current`` and ``src-<source>``);
:func:`load` reads it back by ``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``models:/m-<id>`` or
``runs:/<run id>/model`` and refuses anything else (a pickled ``mlflow.pytorch`` model above all), since
unpickling runs whatever code the pickle holds.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from .errors import PncError
from .models import RECIPE_ATTR
from .models import RECIPE_FORMAT as FORMAT

WEIGHTS_FILE = "weights.safetensors"
RECIPE_FILE = "recipe.json"
TAG_FORMAT = "pnc.model_format"
ARTIFACT_NAME = "model"
REQUIREMENTS = ("torch", "safetensors", "timm", "torchvision")  # pinned in every logged model (pnc itself loads it)


# ------------------------------------------------------------------ recipes
def recipe_of(net: Any) -> dict[str, Any]:
    """The recipe :func:`pnc.models.build_model` recorded on ``net`` (or one set with :func:`factory_recipe`)."""
    recipe = getattr(net, RECIPE_ATTR, None)
    if not isinstance(recipe, dict):
        raise PncError(f"{type(net).__name__} carries no pnc recipe: build it with pnc.models.build_model or "
                       "build_factory_model, or pass recipe=")
    return recipe


def build(recipe: dict[str, Any]) -> Any:
    """A fresh network (no weights loaded) from a recipe; refuses recipes of another format or factory."""
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise PncError(f"model recipe of format {recipe.get('format') if isinstance(recipe, dict) else None!r}; "
                       f"this pnc reads {FORMAT!r}")
    if recipe.get("builder") == "catalog":
        from .models import build_model

        return build_model(recipe["name"], num_classes=int(recipe["num_classes"]), in_chans=int(recipe["in_chans"]),
                           image_size=int(recipe["image_size"]), source=recipe["source"],
                           cifar_stem=recipe.get("cifar_stem"), pretrained=False, **dict(recipe.get("kwargs") or {}))
    if recipe.get("builder") == "factory":
        from .models import build_factory_model
        from .spec import factory_file, file_digest

        ref = str(recipe.get("factory"))
        path = factory_file(ref)
        if path is None or not path.is_file():
            raise PncError(f"the model was built by factory {ref}, whose source is not here (from {Path.cwd()}); "
                           "pnc rebuilds a factory model only from the same source file, which it checks by digest")
        digest = file_digest(path)
        if digest != recipe.get("source_sha256"):
            raise PncError(f"factory {ref}: its source file here has digest {digest}, the model was built with "
                           f"{recipe.get('source_sha256')}; load it with the same version of that code")
        return build_factory_model(ref, num_classes=int(recipe["num_classes"]), in_chans=int(recipe["in_chans"]),
                                   **dict(recipe.get("kwargs") or {}))
    raise PncError(f"model recipe with unknown builder {recipe.get('builder')!r} (expected 'catalog' or 'factory')")


# ------------------------------------------------------------------ files
def save_dir(net: Any, path: Path, recipe: dict[str, Any] | None = None) -> Path:
    """Write ``net``'s tensors and recipe into the folder ``path``."""
    from safetensors.torch import save_model

    recipe = dict(recipe if recipe is not None else recipe_of(net))
    path.mkdir(parents=True, exist_ok=True)
    save_model(net, str(path / WEIGHTS_FILE))
    recipe["weights_sha256"] = hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).hexdigest()
    (path / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True))
    return path


def load_dir(path: Path) -> Any:
    """The network stored in the folder ``path`` by :func:`save_dir`, on the CPU, in eval mode."""
    from safetensors.torch import load_model

    try:
        recipe = json.loads((path / RECIPE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise PncError(f"cannot read the model recipe {path / RECIPE_FILE}: {e}") from None
    weights = path / WEIGHTS_FILE
    if not isinstance(recipe, dict) or hashlib.sha256(weights.read_bytes()).hexdigest() != recipe.get("weights_sha256"):
        raise PncError(f"{weights} does not match the digest its recipe records (changed or truncated)")
    net = build(recipe)
    try:
        load_model(net, str(weights), strict=True, device="cpu")
    except RuntimeError as e:
        raise PncError(f"the stored weights do not fit the network their recipe builds: {str(e).splitlines()[0]}") from None
    return net.eval()


# ------------------------------------------------------------------ MLflow
def log_model(net: Any, run_id: str, recipe: dict[str, Any] | None = None, example: Any = None) -> Any:
    """Log ``net`` to ``run_id`` as an MLflow logged model named ``model``, with the exact versions of the packages
    that load it and, given an ``example`` batch of images, its signature and that input example; returns MLflow's ModelInfo."""
    from importlib.metadata import version

    import mlflow.pyfunc
    import torch
    from mlflow.models import Model, infer_signature

    from . import tracking

    exp = tracking.get_run(run_id).info.experiment_id
    with tempfile.TemporaryDirectory(prefix="pnc-model-") as d, mlflow.start_run(run_id=run_id, experiment_id=exp):
        data = save_dir(net.cpu().eval(), Path(d) / "pnc", recipe)  # in the run's experiment, not MLflow's default one
        signature = None
        if example is not None:
            with torch.no_grad():
                signature = infer_signature(example, net(torch.from_numpy(example)).numpy())
        return tracking.retrying(lambda: Model.log(None, mlflow.pyfunc, name=ARTIFACT_NAME, run_id=run_id,
                                                   loader_module=__name__, data_path=str(data), signature=signature,
                                                   input_example=example,
                                                   pip_requirements=[f"{p}=={version(p)}" for p in REQUIREMENTS]),
                                 resource=f"run {run_id}")


def source_alias(source: str) -> str:
    return "src-" + re.sub(r"[^A-Za-z0-9_-]", "_", source)


def register(net: Any, run_id: str, name: str, tags: dict[str, str], source: str,
             recipe: dict[str, Any] | None = None, example: Any = None) -> Any:
    """Log ``net`` to ``run_id`` and register it as a new version of ``name``, with ``tags`` (and
    ``pnc.model_format``) and the aliases ``current`` and ``src-<source>``; returns the ModelVersion."""
    from . import tracking

    info = log_model(net, run_id, recipe, example)
    c = tracking.client()
    res = f"registered model {name!r}"
    try:
        tracking.retrying(lambda: c.create_registered_model(name, tags={"pnc.study": tags.get("pnc.study", "")}), resource=res)
    except PncError:
        raise
    except Exception:  # noqa: BLE001 - exists already
        pass
    mv = tracking.retrying(lambda: c.create_model_version(name, info.model_uri, run_id=run_id,
                                                          tags={**tags, TAG_FORMAT: FORMAT}, model_id=info.model_id),
                           resource=res)
    for alias in ("current", source_alias(source)):
        set_alias(name, alias, mv.version)
    return mv


def set_alias(name: str, alias: str, version: Any) -> None:
    """Point ``alias`` of registered model ``name`` at ``version``. Processes registering versions of one model at
    once all set its ``current`` alias; MLflow finds the alias, then inserts it, so the loser of that race fails
    with a duplicate key (seen on PostgreSQL); tried again, it finds the alias and moves it (the last one wins)."""
    from . import tracking

    c = tracking.client()
    tracking.again_on_duplicate(lambda: tracking.retrying(lambda: c.set_registered_model_alias(name, alias, version),
                                                          resource=f"registered model {name!r}"))


def _describe_flavors(flavors: dict[str, Any]) -> str:
    if "pytorch" in flavors:
        fmt = flavors["pytorch"].get("serialization_format") or flavors["pytorch"].get("pickle_module_name") or "pickle"
        return f"a torch model saved by mlflow.pytorch ({fmt})"
    pyfunc = flavors.get("python_function", {})
    if pyfunc.get("loader_module"):
        return f"a python_function model loaded by module {pyfunc['loader_module']!r}"
    if pyfunc.get("cloudpickle_version") or pyfunc.get("python_model"):
        return "a pickled python_function model"
    return f"a model with flavors {sorted(flavors) or 'none'}"


def load(uri: str) -> Any:
    """The network behind ``uri`` (``models:/...`` or ``runs:/<id>/model``), on the CPU, unpickling nothing.

    Only models stored by :func:`log_model` are read; any other (e.g. a pickle logged with
    ``mlflow.pytorch.log_model``) is refused with a PncError saying why and how to re-register it."""
    import mlflow.artifacts
    from mlflow.models import Model

    from . import tracking

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per tiny file is noise in a study's log
    c = tracking.client()  # sets MLflow's tracking URI (and credentials come from the environment, the MLflow way)
    m = re.fullmatch(r"runs:/([0-9a-f]{32})/(.+)", uri)
    if m:  # MLflow 3 keeps a run's logged models outside its artifacts: the run's logged model of that name
        run_id, name = m.groups()
        try:
            exp = tracking.retrying(lambda: c.get_run(run_id)).info.experiment_id
            found = [x for x in tracking.retrying(lambda: c.search_logged_models([exp], max_results=1000))
                     if x.source_run_id == run_id and x.name == name]
        except Exception as e:  # noqa: BLE001 - an unknown run is the user's to fix
            raise PncError(f"cannot read model {uri}: {str(e).splitlines()[0]}") from None
        if found:
            uri = f"models:/{found[0].model_id}"
    with tempfile.TemporaryDirectory(prefix="pnc-load-") as d:
        try:
            local = Path(tracking.retrying(lambda: mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=d)))
        except PncError:
            raise
        except Exception as e:  # noqa: BLE001 - a missing model is the user's to fix
            raise PncError(f"cannot read model {uri}: {str(e).splitlines()[0]}") from None
        flavors: dict[str, Any] = {}
        if (local / "MLmodel").exists():
            flavors = Model.load(str(local / "MLmodel")).flavors  # YAML, read with safe_load
        pyfunc = flavors.get("python_function", {})
        if pyfunc.get("loader_module") != __name__ or "pytorch" in flavors or not pyfunc.get("data"):
            what = _describe_flavors(flavors) if flavors else "no MLflow model (no MLmodel file)"
            raise PncError(
                f"refusing to load {uri}: it is {what}, not a pnc model (format {FORMAT}: safetensors weights and a "
                "recipe). Loading it would run whatever code it holds, so pnc never unpickles a model. Re-register it "
                "with pnc: run its study again with --force (a transfer study trains and registers the network as "
                "safetensors), or, if you trust whoever registered it, load it yourself and call "
                "pnc.modelstore.register(net, run_id, name, tags, source, recipe=...).")
        data = (local / pyfunc["data"]).resolve()
        if local.resolve() not in data.parents:
            raise PncError(f"refusing to load {uri}: its MLmodel points outside the model folder ({pyfunc['data']!r})")
        return load_dir(data)


class _Predictor:
    """What ``mlflow.pyfunc.load_model`` returns for a pnc model: ``predict(images) -> logits`` (numpy)."""

    def __init__(self, net: Any) -> None:
        self.net = net

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import numpy as np
        import torch

        with torch.no_grad():
            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            return self.net(x).numpy()


def _load_pyfunc(data_path: str) -> _Predictor:
    """MLflow's loader-module entry point (``mlflow.pyfunc.load_model``): safetensors and a recipe, no pickle."""
    return _Predictor(load_dir(Path(data_path)))
