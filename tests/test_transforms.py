"""transforms.py: output shapes, determinism of eval, randomness of train, Mixup/CutMix targets.

Usage:
    .venv/bin/python -m pytest -q tests/test_transforms.py
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import fixtures
import transforms


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return fixtures.class_image(2, 0, size=300).resize((300, 220))


def test_eval_resize_size() -> None:
    assert [transforms.eval_resize_size(s) for s in (32, 64, 224)] == [37, 73, 256]


@pytest.mark.parametrize("img_size", [32, 64, 224])
def test_output_shapes(img_size: int, photo: Image.Image) -> None:
    for transform in (transforms.build_train_transform(img_size), transforms.build_eval_transform(img_size)):
        out = transform(photo)
        assert out.shape == (3, img_size, img_size) and out.dtype == torch.float32


def test_eval_is_deterministic_and_normalised(photo: Image.Image) -> None:
    transform = transforms.build_eval_transform(64)
    a, b = transform(photo), transform(photo)
    assert torch.equal(a, b)
    grey = Image.new("RGB", (80, 80), tuple(round(255 * m) for m in transforms.IMAGENET_MEAN))
    assert transform(grey).abs().max() < 0.02     # the mean colour normalises to ~0


def test_train_differs_across_calls(photo: Image.Image) -> None:
    transform = transforms.build_train_transform(64)
    outs = [transform(photo) for _ in range(4)]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_train_without_flip_or_randaugment(photo: Image.Image) -> None:
    names = [type(t).__name__ for t in transforms.build_train_transform(32, hflip=0, randaug_n=0).transforms]
    assert "RandAugment" not in names and "RandomHorizontalFlip" not in names
    names = [type(t).__name__ for t in transforms.build_train_transform(32).transforms]
    assert names[:3] == ["RandomResizedCrop", "RandomHorizontalFlip", "RandAugment"]


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_gives_smoothed_soft_targets(mixup_alpha: float, cutmix_alpha: float) -> None:
    torch.manual_seed(0)
    num_classes, smoothing = 10, 0.1
    mixup = transforms.build_mixup(num_classes, mixup_alpha, cutmix_alpha, label_smoothing=smoothing)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8)
    mixed, targets = mixup(images.clone(), labels)
    assert mixed.shape == images.shape and targets.shape == (8, num_classes)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    off = smoothing / num_classes
    assert targets.min() >= off - 1e-6                        # smoothing puts mass on every class
    assert targets.max() <= 1 - smoothing + off + 1e-6
    assert (targets > off + 1e-6).sum(1).max() <= 2           # each target mixes at most two labels


def test_mixup_handles_odd_and_tiny_batches() -> None:
    mixup = transforms.build_mixup(5, label_smoothing=0.1)
    for n in (0, 1, 7):
        images, labels = torch.randn(n, 3, 8, 8), torch.randint(0, 5, (n,))
        mixed, targets = mixup(images, labels)
        assert mixed.shape == (n, 3, 8, 8) and targets.shape == (n, 5)
        if n:
            assert torch.allclose(targets.sum(1), torch.ones(n))
            assert torch.isclose(targets[-1, labels[-1]], torch.tensor(1 - 0.1 + 0.1 / 5))


def test_mixup_disabled() -> None:
    assert transforms.build_mixup(10, 0.0, 0.0) is None


def test_uint8_batches_normalised_on_the_device_equal_the_float_pipeline(photo: Image.Image) -> None:
    """The loaders' uint8 items, batched and normalised by utils.to_device, are the old
    ToTensor + Normalize output up to float rounding (1e-6), for eval and (same seed) train."""
    from helpers import utils

    for build in (transforms.build_eval_transform, transforms.build_train_transform):
        torch.manual_seed(5)
        floats = torch.stack([build(64)(photo) for _ in range(3)])
        torch.manual_seed(5)
        bytes_ = torch.stack([build(64, uint8=True)(photo) for _ in range(3)])
        assert bytes_.dtype == torch.uint8
        normalised, _ = utils.to_device(bytes_, torch.zeros(3, dtype=torch.long), torch.device("cpu"), False)
        assert normalised.dtype == torch.float32
        assert (normalised - floats).abs().max() <= 1e-6
    already = torch.randn(2, 3, 4, 4)
    assert utils.to_device(already, torch.zeros(2), torch.device("cpu"), False)[0] is already   # float: untouched
