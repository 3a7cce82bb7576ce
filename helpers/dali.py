"""NVIDIA DALI input pipelines (--loader dali): the PIL loaders' work done by DALI, on the GPU
when there is one (JPEG decoding with nvJPEG, crop, resize, flip, RandAugment), else on CPU threads.

Usage:
    from helpers import dali
    kind = dali.resolve_loader(args.loader, device)               # "pil" or "dali"
    train = dali.DaliLoader(sets["train"], batch_size=32, device=device, threads=4, img_size=224,
                            augment=dali.TrainAugment(224, hflip=0.5, randaug_n=2, randaug_m=9,
                                                      scale=(0.08, 1.0)),
                            sampler=loading.EpochSeededSampler(len(sets["train"]), seed), drop_last=True)
    val = dali.DaliLoader(sets["val"], batch_size=32, device=device, threads=4, img_size=224)
    for images, labels, n_unreadable in train: ...     # uint8 [B, 3, H, W]; utils.to_device normalises

The images come from the project's own split lists (the datasets' `samples`), in the order of the
project's samplers (loading.EpochSeededSampler, loading.ShardedEpochSampler), so the epoch order,
the sharding over DDP ranks and the position an interrupted epoch resumes at are those of the PIL
loaders. What differs is the augmentation's randomness: DALI draws it from one seed per pipeline,
not from one seed per sample, so every epoch builds a fresh pipeline seeded by the first sample
seed of its order (a function of the run's seed, the epoch and the position it starts at). A run
is repeatable, and a resumed epoch sees the same images in the same order, but its remaining
images get other crops and RandAugment ops than the uninterrupted run would have drawn.

Unreadable images are found before DALI sees them (the file is not a known image, or a JPEG/PNG
ends early) and replaced by a tiny placeholder whose label is -1; the placeholders are dropped
from the batch and counted, as loading.collate_skip_unreadable does. A file that passes those
checks but fails inside DALI (a PNG with broken compressed data) stops the pipeline: the batches
it had taken are then checked with PIL, the files PIL cannot read either are skipped from then on,
and a new pipeline continues from the failed batch. Formats DALI does not decode
(GIF, 16-bit or CMYK images, ...) and extreme aspect ratios are decoded by PIL (loading.decode_image)
and handed over as PNG, so they are not lost. nvidia.dali is imported only when a pipeline is built.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import math
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

import transforms
from helpers import loading
from helpers.utils import UserError

LOADER_CHOICES = ("auto", "pil", "dali")
# Formats and modes DALI decodes to what PIL's decode_image gives; anything else goes through PIL.
NATIVE_FORMATS = frozenset({"JPEG", "PNG", "BMP"})
NATIVE_MODES = frozenset({"RGB", "L"})
# torchvision's RandAugment translates by up to 150/331 of the image (its ImageNet setting).
RANDAUG_MAX_TRANSLATE_REL = 150 / 331
EXIF_ORIENTATION = 0x0112
INSTALL_HINT = "pip install nvidia-dali-cuda130 (see requirements.txt)"


def is_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:   # no "nvidia" namespace package at all
        return False


def resolve_loader(choice: str, device: torch.device) -> str:
    """'pil' or 'dali' for --loader: auto takes DALI on a CUDA device when it is installed (on a
    CPU the PIL path is faster: 276 vs 190 img/s on one thread, measured), else PIL."""
    if choice not in LOADER_CHOICES:
        raise UserError(f"--loader {choice!r}: choose from {', '.join(LOADER_CHOICES)}")
    if choice == "auto":
        return "dali" if device.type == "cuda" and is_installed() else "pil"
    if choice == "dali" and not is_installed():
        raise UserError(f"--loader dali: NVIDIA DALI is not installed ({INSTALL_HINT}); or use --loader pil.")
    return choice


def add_loader_argument(group: Any) -> None:
    """--loader, with one meaning in train.py, pretrain_imagenet.py and pretrain_spark.py."""
    group.add_argument("--loader", default="auto", choices=LOADER_CHOICES,
                       help="input pipeline: pil (PIL + torchvision in DataLoader workers), dali (NVIDIA DALI: "
                            "decoding and augmentation on the GPU, or on --workers CPU threads), or auto (dali "
                            "on CUDA when installed, else pil)")


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """A script's training augmentation, one description for both loaders: the DALI pipeline reads
    it, torchvision() builds the PIL loaders' transforms.build_train_transform from it."""
    img_size: int
    hflip: float = 0.5
    randaug_n: int = 2
    randaug_m: int = 9
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)   # RandomResizedCrop's default, which torchvision() keeps

    def torchvision(self) -> Any:
        """The same augmentation for the PIL loaders (uint8 output: normalised on the device)."""
        return transforms.build_train_transform(self.img_size, hflip=self.hflip, randaug_n=self.randaug_n,
                                                randaug_m=self.randaug_m, scale=self.scale, uint8=True)


# --------------------------------------------------------------------------------------------
# Encoded samples: what the pipeline is fed
# --------------------------------------------------------------------------------------------
def _png_bytes(image: Image.Image) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


PLACEHOLDER = _png_bytes(Image.new("RGB", (8, 8), (128, 128, 128)))


def _ends_complete(data: bytes, image_format: str) -> bool:
    """False for a JPEG without its end marker or a PNG without IEND: a file cut short, which PIL
    refuses to decode (and DALI would fail the whole batch on)."""
    tail = data[-64:]
    if image_format == "JPEG":
        return b"\xff\xd9" in tail
    if image_format == "PNG":
        return b"IEND" in tail
    return True


def _orientation(probe: Image.Image) -> int:
    """The EXIF orientation (1: upright) from the header: PIL's getexif() would decode a whole PNG to
    look for an eXIf chunk after the pixels."""
    if probe.format == "JPEG":
        return probe.getexif().get(EXIF_ORIENTATION, 1)
    raw = probe.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    return exif.get(EXIF_ORIENTATION, 1)


class EncodedImages:
    """Dataset index -> (encoded bytes, upright height, width), or None for an unreadable image.

    Files DALI decodes as PIL would are passed as they are; the rest are decoded by PIL and
    re-encoded as PNG (lossless). In-memory datasets (synthtex) are encoded as PNG too. A file's
    header is read once (its format, mode, size and orientation are kept by index): a loader feeds
    the same files every epoch, from the training thread."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.exif = getattr(dataset, "exif", True)   # --exif: apply EXIF orientation (the PIL path's flag)
        self.headers: dict[int, tuple[str | None, str, int, int, int]] = {}

    def __call__(self, index: int) -> tuple[np.ndarray, int, int] | None:
        if not isinstance(self.dataset, loading.ImageListDataset):
            image = self.dataset.load(index)
            return _png_bytes(image.convert("RGB")), image.height, image.width
        path = self.dataset.samples[index][0]
        try:
            return self._from_file(index, path)
        except loading.UNREADABLE_ERRORS as error:
            self.dataset.warn_unreadable(path, error)
            return None

    def _from_file(self, index: int, path: str) -> tuple[np.ndarray, int, int]:
        with open(path, "rb") as f:
            data = f.read()
        if index not in self.headers:
            with Image.open(io.BytesIO(data)) as probe:   # reads the header only
                self.headers[index] = (probe.format, probe.mode, *probe.size, _orientation(probe))
        image_format, mode, width, height, orientation = self.headers[index]
        if not _ends_complete(data, image_format or ""):
            raise OSError(f"the {image_format} file ends early (truncated)")
        if not self.exif:
            orientation = 1
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        # DALI turns JPEGs upright by their EXIF orientation (when --exif is on); other formats that
        # carry one go through PIL.
        native = (image_format in NATIVE_FORMATS and mode in NATIVE_MODES
                  and (image_format == "JPEG" or orientation == 1)
                  and max(width, height) <= loading.MAX_ASPECT_RATIO * min(width, height))
        if native:
            return np.frombuffer(data, dtype=np.uint8), height, width
        image = loading.decode_image(path, exif=self.exif)
        return _png_bytes(image), image.height, image.width


def eval_geometry(height: int, width: int, img_size: int) -> tuple[int, int, int, int]:
    """(resized height, width, crop top, left) of transforms.build_eval_transform on an image:
    the shorter side to eval_resize_size(img_size) with torchvision's rounding of the long side,
    then torchvision's CenterCrop offsets (Python's round)."""
    new_w, new_h = loading.shorter_side_size(width, height, transforms.eval_resize_size(img_size))
    return new_h, new_w, int(round((new_h - img_size) / 2.0)), int(round((new_w - img_size) / 2.0))


class BatchFeeder:
    """The external source of a pipeline: the epoch's batches of indices as encoded images and
    labels (-1: a placeholder for an unreadable image), plus the eval geometry when evaluating."""

    def __init__(self, encoded: EncodedImages, batches: Sequence[Sequence[int]], img_size: int, evaluation: bool,
                 unreadable: set[int] | None = None) -> None:
        self.encoded, self.targets = encoded, encoded.dataset.targets
        self.batches, self.img_size, self.evaluation = iter(batches), img_size, evaluation
        self.unreadable = unreadable if unreadable is not None else set()
        self.fed = 0   # batches handed to the pipeline (it runs ahead of the ones it has returned)

    def __call__(self) -> tuple[list[np.ndarray], ...]:
        batch = next(self.batches)   # StopIteration ends the epoch
        self.fed += 1
        encoded, labels, sizes, anchors = [], [], [], []
        for index in batch:
            item = None if index in self.unreadable else self.encoded(index)
            data, height, width = item if item is not None else (PLACEHOLDER, 8, 8)
            encoded.append(data)
            labels.append(np.array([self.targets[index] if item is not None else -1], dtype=np.int64))
            if self.evaluation:
                new_h, new_w, top, left = eval_geometry(height, width, self.img_size)
                sizes.append(np.array([new_h, new_w], dtype=np.float32))
                anchors.append(np.array([top, left], dtype=np.int32))
        return (encoded, labels, sizes, anchors) if self.evaluation else (encoded, labels)


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------
def _train_images(encoded: Any, augment: TrainAugment, decoder: str, exif: bool) -> Any:
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import rand_augment

    size = augment.img_size
    images = fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                           random_area=list(augment.scale), random_aspect_ratio=list(augment.ratio),
                                           num_attempts=10, adjust_orientation=exif)
    images = fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
    if augment.hflip > 0:
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=augment.hflip))
    if augment.randaug_n > 0:
        # torchvision's settings: black fill, nearest-neighbour warps, translations up to 150/331.
        images = rand_augment.rand_augment(images, n=augment.randaug_n, m=augment.randaug_m, shape=(size, size),
                                           fill_value=0, interp_type=types.INTERP_NN,
                                           max_translate_rel=RANDAUG_MAX_TRANSLATE_REL)
    return images


def _eval_images(encoded: Any, sizes: Any, anchors: Any, img_size: int, decoder: str, exif: bool) -> Any:
    from nvidia.dali import fn, types

    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, adjust_orientation=exif)
    images = fn.resize(images, resize_y=sizes[0], resize_x=sizes[1], interp_type=types.INTERP_CUBIC, antialias=True)
    crop = np.array([img_size, img_size], dtype=np.int32)
    return fn.slice(images, anchors, types.Constant(crop), axes=[0, 1])


def build_pipeline(feeder: BatchFeeder, batch_size: int, device: torch.device, threads: int, seed: int,
                   augment: TrainAugment | None) -> Any:
    """A built DALI pipeline giving (uint8 images [B, 3, H, W], labels [B, 1]) per run()."""
    from nvidia.dali import fn, pipeline_def, types

    on_gpu = device.type == "cuda"
    decoder = "mixed" if on_gpu else "cpu"

    def graph() -> tuple[Any, Any]:
        if augment is not None:
            encoded, labels = fn.external_source(source=feeder, num_outputs=2, batch=True,
                                                 dtype=[types.UINT8, types.INT64])
            images = _train_images(encoded, augment, decoder, feeder.encoded.exif)
        else:
            encoded, labels, sizes, anchors = fn.external_source(
                source=feeder, num_outputs=4, batch=True, dtype=[types.UINT8, types.INT64, types.FLOAT, types.INT32])
            images = _eval_images(encoded, sizes, anchors, feeder.img_size, decoder, feeder.encoded.exif)
        return fn.transpose(images, perm=[2, 0, 1]), labels

    # RandAugment picks its ops with DALI's conditionals.
    conditionals = augment is not None and augment.randaug_n > 0
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if on_gpu else None
    with quiet_dali_deprecations():
        pipe = pipeline_def(graph, enable_conditionals=conditionals)(
            batch_size=batch_size, num_threads=max(1, threads), device_id=device_id, seed=seed % 2**31,
            prefetch_queue_depth=2)
        pipe.build()
    return pipe


@contextlib.contextmanager
def quiet_dali_deprecations() -> Iterator[None]:
    """Hide the DeprecationWarnings DALI's own auto_aug raises (it calls its fn.experimental aliases,
    and forces them on with its own warnings filter, so a filter cannot): a screenful per epoch."""
    previous = warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if not (issubclass(category, DeprecationWarning) and "nvidia/dali" in filename.replace("\\", "/")):
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _to_torch(tensor_list: Any, device: torch.device) -> torch.Tensor:
    dense = tensor_list.as_tensor()
    if device.type != "cuda":
        return torch.from_numpy(np.array(dense))
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
    return out


class DaliLoader:
    """Batches (uint8 images [B, 3, S, S], labels [B], n_unreadable) of a dataset through DALI.

    Training (augment given): the order of `sampler` (set_epoch it as for a DataLoader; its first
    sample seed seeds the epoch's pipeline). Evaluation: `indices` (default: all, in order),
    resize + centre crop as build_eval_transform. `dataset` keeps the DataLoader attribute of
    that name, so code that asks a loader for len(loader.dataset) works with both.
    """

    def __init__(self, dataset: Any, batch_size: int, device: torch.device, threads: int, img_size: int,
                 augment: TrainAugment | None = None, sampler: Any = None, indices: Sequence[int] | None = None,
                 drop_last: bool = False) -> None:
        if augment is not None and sampler is None:
            raise ValueError("a training DaliLoader needs the sampler that orders its epochs")
        self.dataset, self.batch_size, self.device, self.threads = dataset, batch_size, device, threads
        self.img_size, self.augment, self.sampler, self.drop_last = img_size, augment, sampler, drop_last
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        self.encoded = EncodedImages(dataset)   # kept across epochs: each file's header is read once

    def epoch_order(self) -> tuple[list[int], int]:
        """(this epoch's dataset indices, the pipeline seed)."""
        if self.sampler is None:
            return self.indices, 0
        pairs = list(self.sampler)
        return [index for index, _ in pairs], (pairs[0][1] if pairs else 0)

    def __len__(self) -> int:
        count = len(self.sampler) if self.sampler is not None else len(self.indices)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        order, seed = self.epoch_order()
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        done, unreadable = 0, set()
        while done < len(batches):
            feeder = BatchFeeder(self.encoded, batches[done:], self.img_size, self.augment is None, unreadable)
            pipe = build_pipeline(feeder, self.batch_size, self.device, self.threads, seed + done, self.augment)
            try:
                while True:
                    try:
                        images, labels = pipe.run()
                    except StopIteration:
                        return
                    except RuntimeError:
                        # A file that passed the header checks but that DALI cannot decode: the
                        # pipeline is dead. Find it with PIL, skip it, go on from this batch.
                        if not isinstance(self.dataset, loading.ImageListDataset):
                            raise   # images encoded here (synthtex): not a bad file
                        self._find_unreadable(batches[done:done + feeder.fed], unreadable)
                        break
                    yield self._batch(images, labels)
                    done += 1
            finally:
                del pipe   # frees its threads (and GPU memory) when the epoch ends or is left early

    def _find_unreadable(self, batches: Sequence[Sequence[int]], unreadable: set[int]) -> None:
        """Add the images of `batches` that PIL cannot decode either to `unreadable` (warned as the
        PIL loaders warn); none: a user error naming the files, with the way out."""
        found = set()
        for index in (i for batch in batches for i in batch if i not in unreadable):
            path = self.dataset.samples[index][0]
            try:
                loading.decode_image(path)
            except loading.UNREADABLE_ERRORS as error:
                self.dataset.warn_unreadable(path, error)
                found.add(index)
        if not found:
            names = ", ".join(str(self.dataset.samples[i][0]) for batch in batches for i in batch[:3])
            raise UserError(f"DALI failed to decode a batch that PIL reads (among {names}, ...): use --loader pil "
                            f"for this data.")
        unreadable |= found

    def _batch(self, images: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        labels = torch.from_numpy(np.array(labels.as_tensor())).view(-1)
        images = _to_torch(images, self.device)
        readable = labels >= 0
        skipped = int((~readable).sum())
        if skipped:
            images, labels = images[readable.to(images.device)], labels[readable]
        return images, labels, skipped
