"""--loader dali on the CPU (DALI's CPU-only mode): the same images, order, sharding and skipping as
the PIL loaders, evaluation pixels within a measured tolerance of PIL's, crops from the configured
ranges, and a short train.py / pretrain_imagenet.py run. Skipped where DALI is not installed.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

pytest.importorskip("nvidia.dali")

import datasets  # noqa: E402
import transforms  # noqa: E402
from fixtures import class_image, corrupt, make_imagefolder, make_imagenet_folder, one_error_line  # noqa: E402
from helpers import dali, loading, utils  # noqa: E402
from helpers.utils import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_indexed_images(folder: Path, count: int, size: int = 16) -> list[tuple[str, int]]:
    """`count` small PNGs whose label is their index: a batch's labels say which images it holds."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for index in range(count):
        path = folder / f"{index:03d}.png"
        class_image(index % 5, index, size).save(path)
        samples.append((str(path), index))
    return samples


def labels_of(loader: dali.DaliLoader) -> list[int]:
    return [label for _, labels, _ in loader for label in labels.tolist()]


# --------------------------------------------------------------------------------------------
# Choosing the loader
# --------------------------------------------------------------------------------------------
def test_auto_takes_pil_on_the_cpu_and_dali_is_available_when_asked() -> None:
    assert dali.resolve_loader("auto", CPU) == "pil"      # DALI's CPU path is slower than PIL's
    assert dali.resolve_loader("pil", CPU) == "pil"
    assert dali.resolve_loader("dali", CPU) == "dali"
    with pytest.raises(UserError, match="--loader"):
        dali.resolve_loader("fast", CPU)


@pytest.mark.slow
def test_dali_asked_for_but_missing_is_one_error_line(tmp_path: Path) -> None:
    # A Python whose nvidia.dali cannot be imported (as on a machine without it).
    code = ("import os, sys, runpy; sys.modules['nvidia.dali'] = None; sys.argv = sys.argv[1:]; "
            "sys.path.insert(0, os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "train.py"), "--loader", "dali", "--device", "cpu",
                           "--run_dir", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "DALI is not installed" in line and "--loader pil" in line


# --------------------------------------------------------------------------------------------
# Evaluation: the PIL eval transform's pixels
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_images(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, int]]:
    """JPEGs and PNGs of odd sizes (the long-side rounding and the centre-crop offsets both matter)."""
    folder = tmp_path_factory.mktemp("eval")
    samples = []
    for index, (width, height) in enumerate([(64, 48), (48, 64), (57, 41), (41, 57), (40, 40), (63, 45)]):
        image = class_image(index % 3, index, 64).resize((width, height), Image.Resampling.BICUBIC)
        for suffix in ("png", "jpg"):
            path = folder / f"{index}.{suffix}"
            image.save(path, quality=95)
            samples.append((str(path), index % 3))
    return samples


def test_eval_matches_the_pil_eval_transform(eval_images: list[tuple[str, int]]) -> None:
    """Same geometry (resize of the shorter side to 37 with torchvision's rounding, centre crop 32 at
    torchvision's offsets); the resamplers (PIL's vs DALI's antialiased bicubic) and for JPEG the
    decoders (both libjpeg-turbo, other IDCT/upsampling settings) differ in the last grey levels.
    Measured on these 12 images (grey levels of 0-255): PNG max 3, mean 0.20; JPEG max 2, mean 0.21.
    The same outputs one pixel off differ by 23.8 levels on average, so the bounds (max 4, mean 0.5)
    pin the geometry, not only the colours."""
    dataset = loading.ImageListDataset(eval_images, transforms.build_eval_transform(32))
    got = torch.cat([utils.normalise_uint8(images) for images, _, _ in dali.DaliLoader(dataset, 5, CPU, 1, 32)])
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
    levels = ((got - expected) * torch.tensor(transforms.IMAGENET_STD).view(1, 3, 1, 1) * 255).abs()
    for name, rows in (("png", slice(0, None, 2)), ("jpeg", slice(1, None, 2))):
        assert levels[rows].max() <= 4.0, (name, levels[rows].max())
        assert levels[rows].mean() <= 0.5, (name, levels[rows].mean())


@pytest.mark.parametrize("suffix", ["jpg", "png"])
@pytest.mark.parametrize("exif_on", [True, False])
def test_exif_orientation_follows_the_exif_flag_as_pil_does(suffix: str, exif_on: bool, tmp_path: Path) -> None:
    """A phone photo stored sideways (EXIF orientation 6): both loaders turn it upright with --exif
    on (JPEG: DALI's decoder; PNG: through PIL) and both leave it as stored with --exif off (the
    upstream presets)."""
    exif = Image.Exif()
    exif[dali.EXIF_ORIENTATION] = 6
    path = tmp_path / f"turned.{suffix}"
    class_image(1, 0, 64).resize((64, 40)).save(path, exif=exif, **({"quality": 95} if suffix == "jpg" else {}))
    dataset = loading.ImageListDataset([(str(path), 0)], transforms.build_eval_transform(32), exif=exif_on)
    [(images, _, _)] = list(dali.DaliLoader(dataset, 1, CPU, 1, 32))
    expected, got = dataset[0][0], utils.normalise_uint8(images[0])
    transposed = got.transpose(1, 2)
    assert (got - expected).abs().mean() < 0.02 < (transposed - expected).abs().mean()


def test_a_loader_reads_each_file_header_once(eval_images: list[tuple[str, int]],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The second epoch feeds the same bytes without opening a header again (the training thread
    probes each file once per run, not once per epoch)."""
    dataset = loading.ImageListDataset(eval_images, transforms.build_eval_transform(32, uint8=True))
    loader = dali.DaliLoader(dataset, 4, CPU, 1, 32)
    first = [images for images, _, _ in loader]
    assert len(loader.encoded.headers) == len(eval_images)

    def no_header(*args, **kwargs):
        raise AssertionError("a header was read again")
    monkeypatch.setattr(dali.Image, "open", no_header)   # every file is a JPEG or PNG: no PIL decode
    second = [images for images, _, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_unreadable_images_are_skipped_and_counted(eval_images: list[tuple[str, int]], tmp_path: Path) -> None:
    garbage = corrupt(tmp_path / "garbage.jpg")
    truncated = tmp_path / "truncated.jpg"
    data = Path(eval_images[1][0]).read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    samples = [eval_images[0], (str(garbage), 1), eval_images[2], (str(truncated), 2), eval_images[3]]
    dataset = loading.ImageListDataset(samples, transforms.build_eval_transform(32, uint8=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(dali.DaliLoader(dataset, 4, CPU, 1, 32))
        pil = DataLoader(dataset, batch_size=4, collate_fn=loading.collate_skip_unreadable)
        pil_batches = [(len(images), labels.tolist(), skipped) for images, labels, skipped in pil]
    assert [(len(images), labels.tolist(), skipped) for images, labels, skipped in batches] == pil_batches == \
        [(2, [0, 1], 2), (1, [1], 0)]
    warned = {str(w.message).split(":")[0] for w in caught if issubclass(w.category, loading.UnreadableImageWarning)}
    assert warned == {f"Skipping unreadable image {garbage}", f"Skipping unreadable image {truncated}"}


def test_a_file_dali_fails_on_mid_epoch_is_skipped_and_the_epoch_goes_on(tmp_path: Path) -> None:
    """A PNG with broken compressed data passes the header checks and stops DALI's decoder; the
    loader finds it with PIL and continues from that batch: the same batches as the PIL loader's."""
    samples = write_indexed_images(tmp_path, 10)
    data = bytearray(Path(samples[6][0]).read_bytes())
    start = data.index(b"IDAT") + 20
    data[start:start + 30] = bytes(30)
    Path(samples[6][0]).write_bytes(bytes(data))
    dataset = loading.ImageListDataset(samples, transforms.build_eval_transform(16, uint8=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [(labels.tolist(), skipped) for _, labels, skipped in dali.DaliLoader(dataset, 3, CPU, 1, 16)]
        pil = [(labels.tolist(), skipped) for _, labels, skipped in
               DataLoader(dataset, batch_size=3, collate_fn=loading.collate_skip_unreadable)]
    assert got == pil == [([0, 1, 2], 0), ([3, 4, 5], 0), ([7, 8], 1), ([9], 0)]
    assert any(samples[6][0] in str(w.message) for w in caught if w.category is loading.UnreadableImageWarning)


def test_a_wholly_unreadable_batch_is_an_empty_batch(tmp_path: Path) -> None:
    samples = [(str(corrupt(tmp_path / f"{i}.png")), 0) for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", loading.UnreadableImageWarning)
        [(images, labels, skipped)] = list(dali.DaliLoader(loading.ImageListDataset(samples, None), 2, CPU, 1, 32))
    assert images.shape[0] == 0 and labels.shape == (0,) and skipped == 2


def test_formats_dali_does_not_decode_go_through_pil(tmp_path: Path) -> None:
    """A GIF and a 16-bit PNG are decoded by PIL (decode_image) and handed over as PNG: not lost."""
    gif, deep = tmp_path / "a.gif", tmp_path / "b.png"
    class_image(0, 0, 40).save(gif)
    Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)).save(deep)
    dataset = loading.ImageListDataset([(str(gif), 0), (str(deep), 1)], transforms.build_eval_transform(32))
    [(images, labels, skipped)] = list(dali.DaliLoader(dataset, 2, CPU, 1, 32))
    assert skipped == 0 and labels.tolist() == [0, 1]
    expected = torch.stack([dataset[0][0], dataset[1][0]])
    assert (utils.normalise_uint8(images) - expected).abs().mean() < 0.02


# --------------------------------------------------------------------------------------------
# Training: crop statistics, order, sharding, resume
# --------------------------------------------------------------------------------------------
def crop_geometry(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(area fraction, log aspect w/h) of crops of the coordinate image (red = x, green = y over 256 px),
    read off the first and last rows/columns of the resized crops."""
    images = images.double()
    size = images.shape[-1]
    stretch = size / (size - 1)   # the outer pixel centres sit half an output pixel inside the crop
    width = (images[:, 0, :, -1].mean(1) - images[:, 0, :, 0].mean(1)) * stretch
    height = (images[:, 1, -1, :].mean(1) - images[:, 1, 0, :].mean(1)) * stretch
    return (width * height / 256 ** 2).numpy(), torch.log(width / height).numpy()


def test_train_crops_cover_the_configured_scale_and_ratio_as_pil_does(tmp_path: Path) -> None:
    ramp = np.arange(256, dtype=np.uint8)
    coords = np.stack([np.tile(ramp, (256, 1)), np.tile(ramp[:, None], (1, 256)), np.zeros((256, 256), np.uint8)], -1)
    path = tmp_path / "coords.png"
    Image.fromarray(coords).save(path)
    count, scale = 240, (0.08, 1.0)
    dataset = loading.ImageListDataset([(str(path), 0)] * count, None)
    loader = dali.DaliLoader(dataset, count, CPU, 1, 32, augment=dali.TrainAugment(32, hflip=0, randaug_n=0,
                                                                                    scale=scale),
                             sampler=loading.EpochSeededSampler(count, seed=3))
    [(images, _, _)] = list(loader)
    area, log_ratio = crop_geometry(images)
    pil_tf = transforms.build_train_transform(32, hflip=0, randaug_n=0, scale=scale, uint8=True)
    torch.manual_seed(3)
    pil_area, pil_log_ratio = crop_geometry(torch.stack([pil_tf(Image.fromarray(coords)) for _ in range(count)]))
    # Within the configured ranges (the read-off is good to ~2 px of 256: 2% of a side).
    assert area.min() >= scale[0] * 0.9 and area.max() <= 1.03
    assert log_ratio.min() >= math.log(3 / 4) - 0.05 and log_ratio.max() <= math.log(4 / 3) + 0.05
    # Spread over them as torchvision's RandomResizedCrop is: means within ~3 standard errors of the
    # difference (area sd ~0.27, log-ratio sd ~0.16 over 240 crops each). Measured: area min/mean/max
    # 0.080/0.483/0.968 (DALI) vs 0.082/0.503/0.952 (PIL); log ratio mean 0.005 vs 0.002, sd 0.162 vs 0.165.
    assert area.min() < 0.2 and area.max() > 0.9
    assert abs(area.mean() - pil_area.mean()) < 0.08, (area.mean(), pil_area.mean())
    assert abs(log_ratio.mean() - pil_log_ratio.mean()) < 0.05
    assert abs(log_ratio.std() - pil_log_ratio.std()) < 0.05, (log_ratio.std(), pil_log_ratio.std())


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> loading.ImageListDataset:
    return loading.ImageListDataset(write_indexed_images(tmp_path_factory.mktemp("indexed"), 20), None)


def light(size: int = 16) -> dali.TrainAugment:
    return dali.TrainAugment(size, randaug_n=0)   # RandAugment's pipeline takes seconds to build: not needed here


def test_train_order_is_the_projects_seeded_order(indexed: loading.ImageListDataset) -> None:
    sampler = loading.EpochSeededSampler(len(indexed), seed=7)
    loader = dali.DaliLoader(indexed, 6, CPU, 1, 16, augment=light(), sampler=sampler, drop_last=True)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = utils.epoch_order(7, epoch, len(indexed))[0].tolist()
        assert labels_of(loader) == order[:18]        # 3 full batches of 6; the ragged tail dropped
    assert len(loader) == 3


def test_two_ranks_see_each_image_once_per_epoch_in_the_sharded_order(indexed: loading.ImageListDataset) -> None:
    """loading.ShardedEpochSampler's layout: micro-step m of rank r holds global positions m*B*W + r*B + [0, B)."""
    batch, world, micro = 3, 2, 3
    seen = []
    for rank in range(world):
        sampler = loading.ShardedEpochSampler(len(indexed), 11, rank, world, batch, micro)
        sampler.set_epoch(4)
        labels = labels_of(dali.DaliLoader(indexed, batch, CPU, 1, 16, augment=light(), sampler=sampler,
                                           drop_last=True))
        assert labels == [index for index, _ in sampler]
        seen.append(labels)
    order = utils.epoch_order(11, 4, len(indexed))[0].tolist()
    assert sorted(seen[0] + seen[1]) == sorted(order[:batch * world * micro])
    assert len(set(seen[0] + seen[1])) == batch * world * micro     # no image twice in the epoch
    assert seen[0][:batch] == order[:batch] and seen[1][:batch] == order[batch:2 * batch]


def test_validation_shards_see_every_image_once(indexed: loading.ImageListDataset) -> None:
    """pretrain_imagenet.ValData's split: indices rank::world."""
    shards = [labels_of(dali.DaliLoader(indexed, 4, CPU, 1, 16, indices=range(rank, len(indexed), 2)))
              for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(len(indexed)))


def test_resume_keeps_the_order_and_a_fresh_epoch_its_augmentation(indexed: loading.ImageListDataset) -> None:
    """Epoch 2 from a fresh loader equals epoch 2 of the uninterrupted one, pixels included (each epoch
    builds its pipeline from the epoch's seed); an epoch resumed after 2 batches continues the same
    order (its augmentation is drawn afresh: see helpers/dali.py)."""
    def loader(sampler: loading.EpochSeededSampler) -> dali.DaliLoader:
        return dali.DaliLoader(indexed, 4, CPU, 1, 16, augment=light(), sampler=sampler, drop_last=True)

    straight = loading.EpochSeededSampler(len(indexed), seed=5)
    through = loader(straight)
    for epoch in (0, 1, 2):
        straight.set_epoch(epoch)
        batches = list(through)
    fresh = loading.EpochSeededSampler(len(indexed), seed=5)
    fresh.set_epoch(2)
    again = list(loader(fresh))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    fresh.set_epoch(2, skip=8)
    resumed = labels_of(loader(fresh))
    assert resumed == [label for _, labels, _ in batches[2:] for label in labels.tolist()]


def test_synthtex_is_fed_from_memory() -> None:
    sets, _ = datasets.build_datasets("synthtex", None, 1, None, None, synthtex_size=20)
    sampler = loading.EpochSeededSampler(8, seed=1)
    subset = [sets["train"].samples[i] for i in range(8)]
    dataset = loading.SynthTexDataset(subset, None, size=20)
    [(images, labels, skipped)] = list(dali.DaliLoader(dataset, 8, CPU, 1, 16, augment=light(), sampler=sampler))
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.uint8 and skipped == 0
    assert labels.tolist() == [subset[i][1] for i in utils.epoch_order(1, 0, 8)[0].tolist()]


# --------------------------------------------------------------------------------------------
# The scripts
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_py_with_dali_trains_and_writes_results(tmp_path: Path) -> None:
    """One epoch with the default RandAugment(2, 9); an unreadable training image is skipped and logged."""
    import train

    root = make_imagefolder(tmp_path / "data", classes=2, train_per_class=3, val_per_class=2, test_per_class=1)
    corrupt(root / "train" / "class_1" / "train_0.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", loading.UnreadableImageWarning)
        code = train.main(["--dataset", "imagefolder", "--data_dir", str(root), "--loader", "dali", "--device", "cpu",
                           "--model", "resnet18", "--epochs", "1", "--img_size", "32", "--batch_size", "2",
                           "--workers", "1", "--run_dir", str(tmp_path / "runs"), "--no_progress"])
    assert code == 0
    run = tmp_path / "runs" / "imagefolder_fold1_resnet18_seed42"
    results = json.loads((run / "results.json").read_text())
    assert results["loader"] == "dali" and results["config"]["loader"] == "dali"
    assert results["test_acc"] is not None
    [record] = utils.read_jsonl(run / "log.jsonl")
    assert record["skipped_images"] == 1 and math.isfinite(record["train_loss"])


def test_pretrain_imagenet_with_dali_runs_its_steps(tmp_path: Path) -> None:
    import pretrain_imagenet

    root = make_imagenet_folder(tmp_path / "imagenet", classes=2, train_per_class=4, val_per_class=2, size=40)
    ckpt = tmp_path / "ckpt"
    code = pretrain_imagenet.main(["--data_dir", str(root), "--loader", "dali", "--device", "cpu", "--workers", "1",
                                   "--img_size", "32", "--batch_size", "4", "--epochs", "1", "--randaug_n", "0",
                                   "--print_freq", "0", "--checkpoint_dir", str(ckpt), "--weights_dir",
                                   str(tmp_path / "weights")])
    assert code == 0
    [epoch] = [r for r in utils.read_jsonl(ckpt / "log.jsonl") if r["type"] == "epoch"]
    assert epoch["train_images"] == 8 and epoch["val_images"] == 4


@pytest.mark.slow
def test_pretrain_spark_with_dali_runs_its_steps(tmp_path: Path) -> None:
    import pretrain_spark

    folder = tmp_path / "images"
    write_indexed_images(folder, 8, size=72)
    ckpt = tmp_path / "ckpt"
    code = pretrain_spark.main(["--data_dir", str(folder), "--loader", "dali", "--device", "cpu", "--workers", "1",
                                "--img_size", "64", "--batch_size", "4", "--decoder_width", "128", "--epochs", "1",
                                "--warmup_epochs", "1", "--vis_every", "0", "--no_progress",
                                "--checkpoint_dir", str(ckpt), "--weights_dir", str(tmp_path / "weights")])
    assert code == 0
    [epoch] = [r for r in utils.read_jsonl(ckpt / "log.jsonl") if r["type"] == "epoch"]
    assert epoch["train_images"] == 8 and math.isfinite(epoch["train_loss"])
