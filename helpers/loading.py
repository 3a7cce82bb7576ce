"""From a split's list of files to training batches: image decoding, the Dataset classes, the
seeded sample order and the DataLoader options every script uses.

datasets.py decides which images form a split (the protocols); this module turns a list of
(path, label) pairs into tensors:

    from helpers.loading import ImageListDataset, collate_skip_unreadable
    data = ImageListDataset([("a.jpg", 0), ("b.png", 1)], transform=eval_tf)     # native resolution
    data = ImageListDataset(samples, train_tf, cache=True, decode_size=256)        # the fast path
    loader = DataLoader(data, batch_size=32, collate_fn=collate_skip_unreadable)
    for images, labels, n_skipped in loader: ...

Images are decoded upright (EXIF orientation), in RGB, with extreme aspect ratios centre-cropped
to MAX_ASPECT_RATIO:1; an unreadable image becomes None with a warning, and the collate function
leaves it out of its batch. The samplers give every epoch an order that depends on (seed, epoch)
alone, so a run resumed in the middle of an epoch sees the same remaining images.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler, default_collate

from helpers import utils
from helpers.synthtex import render_synthtex

# Shorter side (px) above which a cached image is shrunk: 2x the eval resize of 256. It keeps every
# image of FMD (384), KTH-TIPS2-b (200), CUB-200 and Flowers-102 (<= 500) and most of DTD (300-640)
# at native resolution, and a 224 px RandomResizedCrop is upsampled from a capped image only when
# it covers less than (224 / 512)^2 = 19% of it.
CACHE_MAX_SHORT = 512


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"})


# Longest side / shortest side an image keeps when decoded: a 2 x 4000 strip would otherwise become
# 256 x 512000 when its shorter side is resized to 256 (1.3 GB of pixels from a 127-byte PNG).
MAX_ASPECT_RATIO = 10.0


def is_image_file(path: Path) -> bool:
    # Hidden files include macOS "._name.jpg" resource forks, which are not images.
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


class UnreadableImageWarning(UserWarning):
    """An image listed in a split could not be decoded; the sample is skipped."""


def resized_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resize (bicubic) so the shorter side is `size`, the long side rounded as torchvision's Resize.

    Matching torchvision's rounding makes the eval Resize a no-op on an image decoded at the eval
    resize size (decode_size), so it is not resampled twice.
    """
    if min(image.size) == size:
        return image
    return image.resize(shorter_side_size(*image.size, size), Image.Resampling.BICUBIC)


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side `size` and the long side rounded as torchvision's Resize."""
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def to_rgb(image: Image.Image) -> Image.Image:
    # 16-bit and float greyscale would be clipped by convert("RGB"); scale them to 8 bits first.
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / peak * 255 + 0.5, 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def cap_aspect_ratio(image: Image.Image, max_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """Centre-crop the long side to max_ratio x the short side; other images are returned as they are.

    Applied on decode, before any resize: resizing an extreme strip by its shorter side makes an
    image of gigabytes, while the crops a texture model takes see only the centre anyway.
    """
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long <= max_ratio * short:
        return image
    keep = max(1, int(max_ratio * short))
    offset = (long - keep) // 2
    box = (offset, 0, offset + keep, height) if width > height else (0, offset, width, offset + keep)
    return image.crop(box)


# What PIL raises for a file it cannot decode (corrupt, truncated, not an image, too many pixels).
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_image(path: str, decode_size: int | None = None, exif: bool = True) -> Image.Image:
    """Decode to RGB, upright (EXIF orientation applied; exif=False: as stored, as the paper code
    decodes), with the aspect ratio capped at MAX_ASPECT_RATIO, at native resolution or resized so
    the shorter side is decode_size.

    Native resolution is the default: crops are then cut from the full image, as in the paper's
    code. decode_size is the fast path for large images (ImageNet): JPEGs much larger than needed
    are decoded at a reduced DCT scale (PIL's draft) before the resize. Every later crop is then
    taken from that smaller copy, so small crops are upsampled more often.
    """
    with Image.open(path) as image:
        if decode_size and image.format == "JPEG" and min(image.size) > 2 * decode_size:
            image.draft("RGB", (decode_size, decode_size))
        image.load()
        # Phone photos store the sensor's orientation in EXIF; a direction-sensitive model must see
        # them as the photographer did.
        if exif:
            ImageOps.exif_transpose(image, in_place=True)
        image = to_rgb(image)
    image = cap_aspect_ratio(image)
    return resized_shorter_side(image, decode_size) if decode_size else image


class ImageListDataset(Dataset):
    """(path, label) samples decoded with PIL; an unreadable image yields None (and one warning).

    Images are decoded at native resolution, or with `decode_size` resized so the shorter side is
    decode_size (see decode_image; exif=False leaves EXIF orientation unapplied). With `cache=True`
    the decoded image is kept in memory, so after the first epoch no file is read again; an image
    whose shorter side exceeds `cache_max_short` (default CACHE_MAX_SHORT = 512; None or 0: no cap,
    every image at native resolution) is first shrunk to it (bicubic), on every epoch alike. Below
    the cap caching changes speed, never results; above it crops come from the shrunk copy.

    Memory: PIL keeps an RGB image as 4 bytes per pixel, so a cached image takes about
    4 * w * h bytes at its cached size, e.g. 1.23 MB for 640 x 480 (measured: 1.20 MB of RSS per
    image over 100 such images), 4 * 512 * 682 = 1.4 MB at most for a 4:3 image at the cap,
    0.16 MB for KTH-TIPS2-b's 200 x 200. A split of n images takes n times that. The cache is
    filled lazily, so with DataLoader workers each worker fills its own copy: memory grows to
    (workers x dataset) at worst, an image may be decoded once per worker, and only
    persistent_workers=True keeps the caches across epochs (without it every epoch starts
    cold). With workers=0 the one cache is full after the first epoch.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None,
                 cache: bool = False, decode_size: int | None = None,
                 cache_max_short: int | None = CACHE_MAX_SHORT, exif: bool = True) -> None:
        self.samples = list(samples)
        self.exif = exif
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.decode_size = decode_size
        self.cache_max_short = cache_max_short
        self.cache: dict[int, Image.Image] | None = {} if cache else None
        self.warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image | None:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        path = self.samples[index][0]
        try:
            image = decode_image(path, self.decode_size, self.exif)
        except UNREADABLE_ERRORS as error:
            self.warn_unreadable(path, error)
            return None
        if self.cache is not None:
            if self.cache_max_short and min(image.size) > self.cache_max_short:
                image = resized_shorter_side(image, self.cache_max_short)
            self.cache[index] = image
        return image

    def warn_unreadable(self, path: str, error: Exception) -> None:
        if path not in self.warned:
            self.warned.add(path)
            warnings.warn(f"Skipping unreadable image {path}: {error}", UnreadableImageWarning, stacklevel=3)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        image = self.load(index)
        if image is None:
            return None
        label = self.samples[index][1]
        return (self.transform(image) if self.transform else image), label


class SynthTexDataset(Dataset):
    """synthtex samples rendered from their ids when first asked for (a few ms each).

    With `cache` the rendered images are kept (per DataLoader worker, as in ImageListDataset).
    """

    def __init__(self, samples: Sequence[tuple[int, int]], transform: Callable | None,
                 size: int = 128, cache: bool = False) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.size = size
        self.cache: dict[int, Image.Image] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        image = render_synthtex(self.samples[index][0], self.size)
        if self.cache is not None:
            self.cache[index] = image
        return image

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load(index)
        label = self.samples[index][1]
        return (self.transform(image) if self.transform else image), label


def loader_options(workers: int, prefetch: int, device: torch.device) -> dict:
    """DataLoader options every script uses: the skipping collate, persistent workers that ignore
    Ctrl-C (the main process stops at a step boundary and saves), pinned memory on CUDA."""
    return dict(num_workers=workers, pin_memory=device.type == "cuda", collate_fn=collate_skip_unreadable,
                persistent_workers=workers > 0, prefetch_factor=prefetch if workers > 0 else None,
                worker_init_fn=utils.ignore_interrupts_in_worker if workers > 0 else None)


def collate_skip_unreadable(batch: Sequence[tuple[Any, int] | None]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Collate (images, labels, n_skipped), dropping the None items of unreadable images.

    A wholly unreadable batch gives empty tensors, so the caller can skip the step and log it.
    """
    items = [item for item in batch if item is not None]
    skipped = len(batch) - len(items)
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, labels = default_collate(items)
    return images, labels, skipped


class SeededSamples(Dataset):
    """Wraps a dataset so that item (index, seed) is drawn with all RNGs seeded by `seed`.

    With the samplers below, every sample's random augmentation depends on its position in the
    epoch only, not on which worker loads it or what ran before: that makes resuming exact.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            utils.seed_everything(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class EpochSeededSampler(Sampler):
    """Yields (index, sample_seed) in the order of utils.epoch_order(seed, epoch).

    `skip` drops the samples an interrupted run already trained on, so an epoch can be finished
    later with the same data.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch, self.skip = size, seed, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = utils.epoch_order(self.seed, self.epoch, self.size)
        return iter(list(zip(order.tolist(), seeds.tolist()))[self.skip:])

    def __len__(self) -> int:
        return self.size - self.skip


class ShardedEpochSampler(Sampler):
    """The epoch order of utils.epoch_order, cut into global batches shared by the processes.

    Micro-step m covers global positions [m*B*W, (m+1)*B*W) and rank r takes its r-th slice of B,
    so an optimizer step always sees the same images for a given global batch, whatever the
    number of processes. The tail that does not fill a global batch is dropped (a different tail
    every epoch). Yields (index, sample_seed).
    """

    def __init__(self, size: int, seed: int, rank: int, world_size: int, batch_size: int,
                 micro_batches: int) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.batch_size, self.micro_batches = batch_size, micro_batches
        self.epoch, self.skip_micro = 0, 0

    def set_epoch(self, epoch: int, skip_micro: int = 0) -> None:
        self.epoch, self.skip_micro = epoch, skip_micro

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = utils.epoch_order(self.seed, self.epoch, self.size)
        block = self.batch_size * self.world_size
        starts = torch.arange(self.skip_micro, self.micro_batches) * block + self.rank * self.batch_size
        positions = (starts[:, None] + torch.arange(self.batch_size)).flatten()
        return iter(zip(order[positions].tolist(), seeds[positions].tolist()))

    def __len__(self) -> int:
        return (self.micro_batches - self.skip_micro) * self.batch_size
