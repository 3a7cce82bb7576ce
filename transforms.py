"""Image transforms and batch mixing of the TwistNet-2D recipe (docs/TRAINING.md "Flags and defaults").

Usage:
    from transforms import build_train_transform, build_eval_transform, build_mixup, eval_resize_size
    train_tf = build_train_transform(224)            # RandomResizedCrop, flip, RandAugment(2, 9), normalise
    eval_tf = build_eval_transform(224)              # resize shorter side to 256, centre crop 224
    eval_tf = build_eval_transform(224, interpolation="bilinear")   # bicubic is the default
    mixup = build_mixup(num_classes=47)              # Mixup 0.8 + CutMix 1.0, label smoothing 0.1
    images, soft_targets = mixup(images, labels)

    python transforms.py --img_size 64               # print both pipelines

The transforms take PIL images and return normalised float32 tensors (C, H, W), or with
uint8=True the uint8 tensors the training scripts' loaders batch (utils.to_device normalises them
on the device, with the same operations in the same order). `--img_size`
scales every crop: eval resizes the shorter side to round(img_size * 256 / 224) first. Crops and
resizes are bicubic and antialiased, as in the paper's code; on PIL images that is PIL's own
resampling, so values stay within 0-255.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup
from timm.data.mixup import mixup_target
from torchvision.transforms import v2

from helpers.utils import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (defined beside the on-device normalisation)

INTERPOLATIONS = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """'bicubic' or 'bilinear' as torchvision's InterpolationMode; anything else is a ValueError."""
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}; got {name!r}")
    return INTERPOLATIONS[name]


def eval_resize_size(img_size: int) -> int:
    """Shorter side to resize to before the centre crop: 256 for 224, in proportion otherwise."""
    return int(round(img_size * 256 / 224))


def to_normalised_tensor(mean: Sequence[float], std: Sequence[float], uint8: bool = False) -> list:
    """The last steps of a pipeline: a normalised float32 tensor, or with `uint8` the uint8 tensor
    (C, H, W) that utils.to_device normalises on the device (the loaders' batches: 4x fewer bytes
    to copy, and the float work off the DataLoader workers)."""
    if uint8:
        return [v2.ToImage()]
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def build_train_transform(img_size: int = 224, hflip: float = 0.5, randaug_n: int = 2, randaug_m: int = 9,
                          scale: tuple[float, float] = (0.08, 1.0), mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD, interpolation: str = "bicubic",
                          uint8: bool = False) -> v2.Compose:
    """RandomResizedCrop, horizontal flip (skipped at 0), RandAugment (skipped at n = 0), normalise
    (with `uint8`: stop at the uint8 tensor, normalised later by utils.to_device)."""
    steps: list = [v2.RandomResizedCrop(img_size, scale=tuple(scale), antialias=True,
                                        interpolation=interpolation_mode(interpolation))]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if randaug_n > 0:
        steps.append(v2.RandAugment(num_ops=randaug_n, magnitude=randaug_m))
    return v2.Compose(steps + to_normalised_tensor(mean, std, uint8))


def build_eval_transform(img_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD, interpolation: str = "bicubic",
                         uint8: bool = False) -> v2.Compose:
    """Resize the shorter side to eval_resize_size(img_size), centre crop img_size, normalise (or,
    with `uint8`, stop at the uint8 tensor)."""
    resize = v2.Resize(eval_resize_size(img_size), interpolation=interpolation_mode(interpolation), antialias=True)
    return v2.Compose([resize, v2.CenterCrop(img_size), *to_normalised_tensor(mean, std, uint8)])


def load_image_tensor(path: str | Path, img_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """(input batch [1, 3, H, W] through the eval transform, the same crop as an RGB array in [0, 1])."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image not found: {path}")
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    tensor = build_eval_transform(img_size)(rgb)
    return tensor.unsqueeze(0), denormalise(tensor).permute(1, 2, 0).numpy()


def denormalise(tensor: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Undo the normalisation of a [3, H, W] (or [B, 3, H, W]) tensor: RGB values in [0, 1]."""
    shape = (3, 1, 1) if tensor.ndim == 3 else (1, 3, 1, 1)
    mean_t = torch.tensor(mean, dtype=tensor.dtype, device=tensor.device).view(shape)
    std_t = torch.tensor(std, dtype=tensor.dtype, device=tensor.device).view(shape)
    return (tensor * std_t + mean_t).clamp(0, 1)


class OddBatchMixup(Mixup):
    """timm's Mixup that also takes odd and empty batches.

    timm asserts an even batch, but a batch loses its unreadable images before it gets here
    (loading.collate_skip_unreadable), so any size can arrive. An odd batch mixes all but its
    last image; that one keeps its own (label-smoothed) target.
    """

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) % 2 == 0 and len(x) > 0:
            return super().__call__(x, target)
        if len(x) <= 1:
            return x, self.plain_target(target)
        # The slice is a view: timm mixes it in place, so x itself is mixed.
        _, mixed_target = super().__call__(x[:-1], target[:-1])
        return x, torch.cat([mixed_target, self.plain_target(target[-1:])])

    def plain_target(self, target: torch.Tensor) -> torch.Tensor:
        if len(target) == 0:
            return torch.zeros(0, self.num_classes, device=target.device)
        return mixup_target(target, self.num_classes, 1.0, self.label_smoothing)


def build_mixup(num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                label_smoothing: float = 0.1, prob: float = 1.0) -> OddBatchMixup | None:
    """Batch Mixup/CutMix (switching 50/50 when both are on) giving label-smoothed soft targets.

    None when both alphas are 0: the caller then uses hard labels with its own label smoothing.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return OddBatchMixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=0.5,
                         mode="batch", label_smoothing=label_smoothing, num_classes=num_classes)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the train and eval pipelines for an image size.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--img_size", type=int, default=224)
    args = parser.parse_args(argv)
    print("train:", build_train_transform(args.img_size))
    print("eval:", build_eval_transform(args.img_size))


if __name__ == "__main__":
    main()
