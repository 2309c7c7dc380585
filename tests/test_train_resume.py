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
