"""Resuming training is exact also with data-loader workers and random augmentation: the augmentation of
sample i in epoch e depends only on (seed, e, i), never on how many epochs this process has run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pnc.data.base import ImageSplit
from pnc.data.torchdata import Augment, ImageDataset, make_augment
from pnc.models import build_model
from pnc.spec import TrainSpec
from pnc.train import make_accelerator, train


def _split(n: int = 96, size: int = 12) -> ImageSplit:
    rng = np.random.default_rng(0)
    return ImageSplit("synthetic", [str(i) for i in range(4)], rng.integers(0, 4, n),
                      images=rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8))


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


@pytest.mark.parametrize("padding", [2, 0], ids=["pad-crop", "random-resized-crop"])
def test_resume_with_workers_and_augmentation_matches_uninterrupted(tmp_path: Path, padding: int) -> None:
    aug = {"random_crop": True, "crop_padding": padding, "horizontal_flip": True}
    tspec = TrainSpec(epochs=3, batch_size=32, num_workers=2, augmentation=aug, seed=7, optimizer={"lr": 0.05})

    def run(epochs: int, ckpt: Path) -> torch.nn.Module:
        torch.manual_seed(0)
        model = build_model("resnet8", num_classes=4, in_chans=1, image_size=12)
        if ckpt.exists():  # what the runner does on resume: build, then load the checkpoint inside train()
            torch.manual_seed(123)  # a resumed process has consumed its RNG differently
        ds = ImageDataset(_split(), image_size=12, channels=1, augment=make_augment(tspec.augmentation, tspec.seed))
        spec = tspec.model_copy(update={"epochs": epochs})
        train(model, ds, spec, accelerator=make_accelerator("fp32", 1), checkpoint=ckpt, progress=False)
        return model

    straight = run(3, tmp_path / "a.pt")
    run(1, tmp_path / "b.pt")  # "killed" after epoch 0's checkpoint
    resumed = run(3, tmp_path / "b.pt")
    assert torch.equal(_weights(straight), _weights(resumed)), "resumed training diverged from the uninterrupted run"


def test_augmentation_depends_only_on_seed_epoch_and_index() -> None:
    x = torch.linspace(-1, 1, 3 * 16 * 16).reshape(3, 16, 16)
    for padding in (4, 0):
        a = Augment(random_crop=True, padding=padding, horizontal_flip=True, seed=3)
        torch.manual_seed(0)
        first = a(x, a.generator(5, 11))
        torch.manual_seed(99)
        assert torch.equal(first, a(x, a.generator(5, 11))), "the global RNG must not matter"
        outs = {tuple(a(x, a.generator(e, i)).flatten()[:64].tolist()) for e in range(4) for i in range(4)}
        assert len(outs) > 4, "different (epoch, index) pairs get different crops"
        assert a(x, a.generator(1, 2)).shape == x.shape


def test_epoch_is_passed_to_workers_through_the_sampler_keys() -> None:
    ds = ImageDataset(_split(8, 8), image_size=8, channels=1,
                      augment=Augment(random_crop=True, padding=2, horizontal_flip=True, seed=1))
    x_e0, y0, i0 = ds[3]
    x_e2, y2, i2 = ds[2 * 8 + 3]
    assert i0 == i2 == 3 and int(y0[0]) == int(y2[0])
    assert torch.equal(x_e2, ds.augment(ds._load(3), ds.augment.generator(2, 3)))
    assert torch.equal(x_e0, ds.augment(ds._load(3), ds.augment.generator(0, 3)))


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path: Path) -> None:
    """A cell's checkpoint left by another run (other data, another MLflow store) is ignored: training starts over."""
    tspec = TrainSpec(epochs=2, batch_size=32, seed=3, optimizer={"lr": 0.05})
    ds = ImageDataset(_split(), image_size=12, channels=1)
    acc = make_accelerator("fp32", 1)

    def model():
        torch.manual_seed(0)
        return build_model("resnet8", num_classes=4, in_chans=1, image_size=12)

    ckpt = tmp_path / "cell.pt"
    train(model(), ds, tspec.model_copy(update={"epochs": 1}), accelerator=acc, checkpoint=ckpt, progress=False,
          extra_state={"run_id": "run-A"})
    mine = train(model(), ds, tspec, accelerator=acc, checkpoint=ckpt, progress=False, extra_state={"run_id": "run-B"})
    assert mine.resumed_from is None, "started over"
    same = train(model(), ds, tspec, accelerator=acc, checkpoint=tmp_path / "other.pt", progress=False,
                 extra_state={"run_id": "run-C"})
    assert mine.loss == same.loss
    resumed = train(model(), ds, tspec.model_copy(update={"epochs": 3}), accelerator=acc, checkpoint=ckpt, progress=False,
                    extra_state={"run_id": "run-B"})
    assert resumed.resumed_from == 2, "its own checkpoint is resumed"


def _tiny_run(tmp: Path, epochs: int, ckpt: Path, *, scaler=None, reseed: int | None = None):
    """Build (seeded), train to ``epochs`` from ``ckpt`` when present; ``reseed``: scramble every global RNG first,
    as a fresh process resuming a killed one would have them. Returns (model, result, accelerator)."""
    import random

    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=4, in_chans=1, image_size=12, widths=[4, 8, 16])
    if reseed is not None:
        random.seed(reseed)
        np.random.seed(reseed)
        torch.manual_seed(reseed)
    acc = make_accelerator("fp32", 1)
    if scaler is not None:
        acc.scaler = scaler()
    tspec = TrainSpec(epochs=epochs, batch_size=32, seed=7, optimizer={"lr": 0.05})
    result = train(model, ImageDataset(_split(), image_size=12, channels=1), tspec, accelerator=acc, checkpoint=ckpt,
                   progress=False)
    return model, result, acc


def _draws() -> tuple:
    import random

    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_checkpoint_loads_with_weights_only_and_resumes_every_rng(tmp_path: Path) -> None:
    """The checkpoint is tensors and plain types (torch.load(weights_only=True) reads it) and holds this process's
    python, numpy and torch RNG states: a resumed process continues with the RNG streams of the uninterrupted one."""
    import random

    from pnc.train import CHECKPOINT_FORMAT

    random.seed(1)
    np.random.seed(1)
    _tiny_run(tmp_path, 3, tmp_path / "a.pt")
    straight = _draws()
    random.seed(1)
    np.random.seed(1)
    _tiny_run(tmp_path, 1, tmp_path / "b.pt")  # "killed" after epoch 0's checkpoint
    state = torch.load(tmp_path / "b.pt", map_location="cpu", weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT and state["epoch"] == 0 and state["world"] == 1
    assert len(state["rng"]) == 1 and set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert state["scaler"] is None, "no gradient scaler in an fp32 run"
    _, resumed, _ = _tiny_run(tmp_path, 3, tmp_path / "b.pt", reseed=123)
    assert resumed.resumed_from == 1
    assert _draws() == straight, "python, numpy and torch RNGs continue where the uninterrupted run's were"


def test_a_checkpoint_that_needs_unpickling_code_is_not_loaded(tmp_path: Path) -> None:
    """weights_only=True: a checkpoint holding an arbitrary object (it could run code when unpickled) is refused and
    training starts over; so is one of the older format."""
    from pnc.train import CHECKPOINT_FORMAT, load_checkpoint

    evil = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "epoch": 0, "payload": Path("/")}, evil)
    assert load_checkpoint(evil) is None
    old = tmp_path / "old.pt"
    torch.save({"epoch": 0, "torch_rng": torch.get_rng_state()}, old)
    assert load_checkpoint(old) is None


def test_gradient_scaler_state_is_checkpointed_and_resumed(tmp_path: Path) -> None:
    """fp16 training carries a gradient scaler whose scale changes as training goes (grown after ``growth_interval``
    clean steps, halved on an overflow). Accelerate creates it for fp16 on a GPU only, so this test runs the same code
    path on the CPU with a CPU GradScaler put in its place (fp32 compute). A scale of 2**-126 (growing every 2 steps)
    puts the scaled gradients among float32's subnormal numbers, where they lose precision according to the scale:
    the weights then depend on the scale's history, as fp16 gradients do. Resumed after epoch 0, training must end
    with the uninterrupted run's scaler state and weights. (A resume that restarted the scaler ended 2**-123 instead
    of 2**-122, its weights up to 2.3e-3 away.)"""
    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** -126, growth_interval=2)

    straight, _, acc_a = _tiny_run(tmp_path, 3, tmp_path / "a.pt", scaler=scaler)
    _tiny_run(tmp_path, 1, tmp_path / "b.pt", scaler=scaler)
    saved = torch.load(tmp_path / "b.pt", map_location="cpu", weights_only=True)["scaler"]
    assert saved is not None and saved["scale"] == 2.0 ** -125, "the scaler's state after epoch 0 is in the checkpoint"
    resumed, result, acc_b = _tiny_run(tmp_path, 3, tmp_path / "b.pt", scaler=scaler, reseed=5)
    assert result.resumed_from == 1
    assert acc_a.scaler.state_dict()["scale"] == 2.0 ** -122
    assert acc_b.scaler.state_dict() == acc_a.scaler.state_dict()
    assert torch.equal(_weights(straight), _weights(resumed)), "resumed scaled training diverged from the uninterrupted run"


def test_fp16_on_a_cpu_warns_and_records_fp32(tmp_path: Path) -> None:
    """Accelerate has no fp16 autocast or gradient scaler on the CPU: precision fp16 trains in fp32 there. pnc warns
    and the training result says fp32 (the runner records it as the run's tag pnc.precision_used)."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU fp16 runs as asked; this checks the CPU fallback")
    with pytest.warns(UserWarning, match=r"train.precision fp16 needs a GPU; training runs in fp32"):
        acc = make_accelerator("fp16", 1)
    tspec = TrainSpec(epochs=1, batch_size=32, seed=7, precision="fp16", optimizer={"lr": 0.05})
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=4, in_chans=1, image_size=12, widths=[4, 8, 16])
    result = train(model, ImageDataset(_split(), image_size=12, channels=1), tspec, accelerator=acc, progress=False)
    assert result.precision == "fp32"
