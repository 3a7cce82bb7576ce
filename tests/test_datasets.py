"""datasets.py on tiny datasets in each official layout: splits, errors, loading, cache, CLI, synthtex.

Usage:
    .venv/bin/python -m pytest -q tests/test_datasets.py
"""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import datasets
import fixtures
import transforms
from helpers import loading, utils

ROOT = Path(__file__).resolve().parents[1]
EVAL_32 = transforms.build_eval_transform(32)

# (dataset, fixture name, expected train/val/test sizes of every fold)
PROTOCOLS = [
    ("dtd", "dtd_root", (6, 6, 6)),            # 3 classes x 2/2/2
    ("fmd", "fmd_root", (12, 3, 15)),          # 3 x 10: 5 test, 4 train + 1 val per class
    ("kth_tips2", "kth_root", (24, 3, 9)),     # 3 x 4 samples x 3: one sample tests, 10% of 9 -> 1 val
    ("cub200", "cub_root", (12, 3, 12)),       # 3 x (5 train, 4 test): 1 val carved per class
    ("flowers102", "flowers_root", (6, 6, 12)),  # 3 x 8: official 2/2/4 per class
    ("imagefolder", "imagefolder_root", (12, 6, 6)),
]
MULTI_FOLD = [p for p in PROTOCOLS if p[0] != "imagefolder"]


def split_keys(splits: datasets.Splits) -> dict[str, set]:
    return {name: {key for key, _ in splits.split(name)} for name in datasets.SPLIT_NAMES}


def assert_disjoint(splits: datasets.Splits) -> None:
    keys = split_keys(splits)
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]


# --------------------------------------------------------------------------------------------
# Splits of every protocol
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset, fixture, sizes", PROTOCOLS)
def test_split_sizes_and_disjointness(dataset: str, fixture: str, sizes: tuple, request) -> None:
    root = request.getfixturevalue(fixture)
    for fold in range(1, min(datasets.num_folds(dataset) or 3, 3) + 1):
        splits = datasets.load_splits(dataset, root, fold)
        assert (len(splits.train), len(splits.val), len(splits.test)) == sizes, (dataset, fold)
        assert len(splits.classes) == 3
        assert_disjoint(splits)
        labels = {label for name in datasets.SPLIT_NAMES for _, label in splits.split(name)}
        assert labels == {0, 1, 2}


@pytest.mark.parametrize("dataset, fixture, sizes", MULTI_FOLD)
def test_splits_are_deterministic_and_ignore_global_seeds(dataset: str, fixture: str, sizes: tuple,
                                                           request) -> None:
    root = request.getfixturevalue(fixture)
    results = []
    for seed in (0, 12345):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        results.append(datasets.load_splits(dataset, root, 2))
    assert results[0] == results[1]


@pytest.mark.parametrize("dataset, fixture, sizes", MULTI_FOLD)
def test_folds_differ(dataset: str, fixture: str, sizes: tuple, request) -> None:
    root = request.getfixturevalue(fixture)
    one, two = datasets.load_splits(dataset, root, 1), datasets.load_splits(dataset, root, 2)
    if dataset == "cub200":     # the official test set is fixed; only the val carve moves
        assert one.test == two.test and one.val != two.val
    else:
        assert split_keys(one) != split_keys(two)


def test_kth_tests_on_one_sample_per_fold(kth_root: Path) -> None:
    for fold, sample in enumerate("abcd", 1):
        splits = datasets.load_splits("kth_tips2", kth_root, fold)
        assert all(f"/sample_{sample}/" in key for key, _ in splits.test)
        assert not any(f"/sample_{sample}/" in key for key, _ in splits.train + splits.val)


def test_fmd_is_stratified_half_test(fmd_root: Path) -> None:
    splits = datasets.load_splits("fmd", fmd_root, 3)
    for split, per_class in (("train", 4), ("val", 1), ("test", 5)):
        assert datasets.class_balance(splits.split(split), 3) == (per_class, per_class)


def test_flowers_fold1_is_official_and_later_folds_keep_class_counts(flowers_root: Path) -> None:
    import scipy.io

    setid = scipy.io.loadmat(str(flowers_root / "setid.mat"))
    one = datasets.load_splits("flowers102", flowers_root, 1)
    official_train = {str(flowers_root / "jpg" / f"image_{i:05d}.jpg") for i in setid["trnid"].ravel()}
    assert {key for key, _ in one.train} == official_train
    assert one.classes == ["flower_001", "flower_002", "flower_003"]
    for fold in (2, 3):
        other = datasets.load_splits("flowers102", flowers_root, fold)
        for split in datasets.SPLIT_NAMES:
            assert datasets.class_balance(other.split(split), 3) == datasets.class_balance(one.split(split), 3)


def test_cub_accepts_the_folder_above(cub_root: Path) -> None:
    assert datasets.load_splits("cub200", cub_root.parent, 1) == datasets.load_splits("cub200", cub_root, 1)


def test_imagefolder_test_split_is_optional(tmp_path: Path) -> None:
    root = fixtures.make_imagefolder(tmp_path / "if", test_per_class=0)
    sets, classes = datasets.build_datasets("imagefolder", root, 1, EVAL_32, EVAL_32)
    assert (len(sets["train"]), len(sets["val"]), len(sets["test"])) == (12, 6, 0)
    assert classes == ["class_0", "class_1", "class_2"]


def test_imagenet_folder_fixture_reads_as_imagefolder(imagenet_root: Path) -> None:
    splits = datasets.load_splits("imagefolder", imagenet_root, 1)
    assert (len(splits.classes), len(splits.train), len(splits.val)) == (3, 24, 12)
    assert all(key.endswith(".JPEG") for key, _ in splits.train)


@pytest.mark.slow
def test_official_sizes_from_full_size_indexes(tmp_path: Path) -> None:
    """Real-size index files with empty image files: load_splits must not open any image."""
    dtd = fixtures.full_size_dtd_index(tmp_path / "dtd")
    cub = fixtures.full_size_cub_index(tmp_path / "cub")
    flowers = fixtures.full_size_flowers_index(tmp_path / "flowers")
    expected = [("dtd", dtd, 47, (1880, 1880, 1880)), ("cub200", cub.parent, 200, (5394, 600, 5794)),
                ("flowers102", flowers, 102, (1020, 1020, 6149))]
    for dataset, root, n_classes, sizes in expected:
        for fold in (1, 2):
            splits = datasets.load_splits(dataset, root, fold)
            assert len(splits.classes) == n_classes
            assert (len(splits.train), len(splits.val), len(splits.test)) == sizes, (dataset, fold)
    cub_splits = datasets.load_splits("cub200", cub, 1)
    assert len(cub_splits.train) + len(cub_splits.val) == 5994
    assert datasets.class_balance(cub_splits.val, 200) == (3, 3)
    flowers_fold2 = datasets.load_splits("flowers102", flowers, 2)
    assert datasets.class_balance(flowers_fold2.train, 102) == (10, 10)
    assert datasets.class_balance(flowers_fold2.val, 102) == (10, 10)


# --------------------------------------------------------------------------------------------
# Layout errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", [d for d in datasets.DATASET_NAMES if d != "synthtex"])
def test_missing_folder_is_a_clear_error(dataset: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        datasets.load_splits(dataset, missing, 1)
    with pytest.raises(ValueError, match="--data_dir"):
        datasets.load_splits(dataset, None, 1)


@pytest.mark.parametrize("dataset", [d for d in datasets.DATASET_NAMES if d != "synthtex"])
def test_empty_folder_names_what_is_expected(dataset: str, tmp_path: Path) -> None:
    with pytest.raises((FileNotFoundError, ValueError), match="Expected|expected"):
        datasets.load_splits(dataset, tmp_path, 1)


def test_missing_dtd_split_file(tmp_path: Path) -> None:
    root = fixtures.make_dtd(tmp_path / "dtd", folds=2)
    (root / "labels" / "val2.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"DTD split file not found: .*val2\.txt.*folds 1-10"):
        datasets.load_splits("dtd", root, 2)


def test_dtd_split_listing_a_missing_image(tmp_path: Path) -> None:
    root = fixtures.make_dtd(tmp_path / "dtd", folds=1)
    listed = (root / "labels" / "test1.txt").read_text().split()[0]
    (root / "images" / listed).unlink()
    with pytest.raises(FileNotFoundError, match=listed.split("/")[1]):
        datasets.load_splits("dtd", root, 1)


@pytest.mark.parametrize("dataset, fold", [("dtd", 0), ("dtd", 11), ("fmd", 11), ("kth_tips2", 5),
                                           ("imagefolder", 2), ("cub200", 0), ("synthtex", -1)])
def test_fold_out_of_range(dataset: str, fold: int, dtd_root: Path) -> None:
    with pytest.raises(ValueError, match=f"fold {fold}"):
        datasets.load_splits(dataset, dtd_root, fold)


def test_num_folds() -> None:
    assert [datasets.num_folds(d) for d in datasets.DATASET_NAMES] == [10, 10, 4, None, None, 1, None]
    with pytest.raises(ValueError, match="known"):
        datasets.num_folds("imagenet21k")


@pytest.mark.parametrize("dataset, builder, class_dir", [
    ("dtd", fixtures.make_dtd, "images/empty_class"),
    ("fmd", fixtures.make_fmd, "image/empty_class"),
    ("kth_tips2", fixtures.make_kth_tips2, None),
    ("imagefolder", fixtures.make_imagefolder, "train/empty_class"),
])
def test_empty_class_is_a_clear_error(dataset: str, builder, class_dir: str | None, tmp_path: Path) -> None:
    root = builder(tmp_path / dataset)
    if class_dir is None:   # KTH: a material whose sample folders hold no image
        for sample in "abcd":
            (root / "empty_class" / f"sample_{sample}").mkdir(parents=True)
    else:
        (root / class_dir).mkdir(parents=True)
    with pytest.raises(ValueError, match="empty_class"):
        datasets.load_splits(dataset, root, 1)


def test_kth_material_without_a_sample_folder(tmp_path: Path) -> None:
    root = fixtures.make_kth_tips2(tmp_path / "kth")
    shutil.rmtree(root / "cork" / "sample_c")
    with pytest.raises(FileNotFoundError, match=r"cork.*sample_c|sample_c.*cork"):
        datasets.load_splits("kth_tips2", root, 1)


def test_cub_and_flowers_missing_index_files(tmp_path: Path) -> None:
    cub = fixtures.make_cub(tmp_path / "cub")
    (cub / "train_test_split.txt").unlink()
    with pytest.raises(FileNotFoundError, match="train_test_split.txt"):
        datasets.load_splits("cub200", cub, 1)
    flowers = fixtures.make_flowers(tmp_path / "flowers")
    (flowers / "setid.mat").unlink()
    with pytest.raises(FileNotFoundError, match="setid.mat"):
        datasets.load_splits("flowers102", flowers, 1)


# --------------------------------------------------------------------------------------------
# Loading: unreadable images, cache, DataLoader
# --------------------------------------------------------------------------------------------
def test_items_are_tensors_with_labels(dtd_root: Path) -> None:
    train_tf = transforms.build_train_transform(32)
    sets, classes = datasets.build_datasets("dtd", dtd_root, 1, train_tf, EVAL_32, cache_size=37)
    assert classes == ["banded", "dotted", "zigzagged"]
    for split in datasets.SPLIT_NAMES:
        image, label = sets[split][0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label in (0, 1, 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_is_skipped_warned_and_counted(tmp_path: Path, workers: int) -> None:
    root = fixtures.make_dtd(tmp_path / "dtd", folds=1)
    listed = (root / "labels" / "train1.txt").read_text().split()[0]
    fixtures.corrupt(root / "images" / listed)
    sets, _ = datasets.build_datasets("dtd", root, 1, EVAL_32, EVAL_32, cache_size=37)
    with pytest.warns(loading.UnreadableImageWarning, match=listed.split("/")[1]):
        assert sets["train"][0] is None
    loader = DataLoader(sets["train"], batch_size=4, num_workers=workers,
                        collate_fn=loading.collate_skip_unreadable)
    seen = skipped = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for images, labels, n_skipped in loader:
            assert images.shape[0] == labels.shape[0]
            seen += len(labels)
            skipped += n_skipped
    assert (seen, skipped) == (5, 1)


def test_unreadable_warning_once_per_path(tmp_path: Path) -> None:
    root = fixtures.make_dtd(tmp_path / "dtd", folds=1)
    listed = (root / "labels" / "train1.txt").read_text().split()[0]
    fixtures.corrupt(root / "images" / listed)
    sets, _ = datasets.build_datasets("dtd", root, 1, EVAL_32, EVAL_32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert sets["train"][0] is None
    assert len([w for w in caught if issubclass(w.category, loading.UnreadableImageWarning)]) == 1


def test_collate_of_an_all_unreadable_batch() -> None:
    images, labels, skipped = loading.collate_skip_unreadable([None, None, None])
    assert images.numel() == 0 and labels.numel() == 0 and skipped == 3
    images, labels, skipped = loading.collate_skip_unreadable([None, (torch.zeros(3, 4, 4), 2)])
    assert images.shape == (1, 3, 4, 4) and labels.tolist() == [2] and skipped == 1


def test_cache_serves_images_after_the_files_are_gone(tmp_path: Path) -> None:
    root = fixtures.make_dtd(tmp_path / "dtd", folds=1, size=48)
    cached, _ = datasets.build_datasets("dtd", root, 1, EVAL_32, EVAL_32, cache=True, cache_size=37)
    uncached, _ = datasets.build_datasets("dtd", root, 1, EVAL_32, EVAL_32, cache=False, cache_size=37)
    first = [cached["val"][i] for i in range(len(cached["val"]))]
    reference = [uncached["val"][i] for i in range(len(uncached["val"]))]
    shutil.rmtree(root / "images")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a re-read would warn about the missing file
        second = [cached["val"][i] for i in range(len(cached["val"]))]
    for (a, label_a), (b, label_b), (c, _) in zip(first, second, reference):
        assert torch.equal(a, b) and label_a == label_b
        assert torch.equal(a, c)     # caching changes speed, never the tensors
    assert min(min(image.size) for image in cached["val"].cache.values()) == 37


def test_large_jpeg_is_decoded_at_reduced_size(tmp_path: Path) -> None:
    path = fixtures.write_image(tmp_path / "big.jpg", 1, 0, size=400)
    assert loading.decode_image(str(path), 37).size == (37, 37)
    assert loading.decode_image(str(path), None).size == (400, 400)
    wide = tmp_path / "wide.jpg"
    fixtures.class_image(1, 0, size=400).resize((410, 299)).save(wide)
    decoded = loading.decode_image(str(wide), 37)
    assert decoded.size == (50, 37)
    # The eval Resize then leaves the decoded image untouched: no second resampling.
    assert np.array_equal(np.asarray(v2.Resize(37, antialias=True)(decoded)), np.asarray(decoded))
    grey = tmp_path / "grey.png"
    fixtures.class_image(0, 0).convert("L").save(grey)
    assert loading.decode_image(str(grey), None).mode == "RGB"


# --------------------------------------------------------------------------------------------
# describe CLI
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_describe_prints_sizes_and_flags_corrupt_files(tmp_path: Path, capsys) -> None:
    root = fixtures.make_dtd(tmp_path / "dtd", folds=1)
    args = ["--dataset", "dtd", "--data_dir", str(root), "--fold", "1", "--no_progress"]
    assert datasets.main(args) == 0
    out = capsys.readouterr().out
    assert "3 classes" in out and "all 18 images open" in out
    for split in ("train", "val", "test"):
        assert any(line.split()[:3] == [split, "6", "2/2"] for line in out.splitlines())

    # The real command line, as a user runs it: exit status 1 and the culprit named.
    listed = (root / "labels" / "val1.txt").read_text().split()[0]
    fixtures.corrupt(root / "images" / listed)
    broken = subprocess.run([sys.executable, str(ROOT / "datasets.py"), *args],
                            capture_output=True, text=True, timeout=300)
    assert broken.returncode == 1, broken.stderr
    assert any(line.split()[:3] == ["train", "6", "2/2"] for line in broken.stdout.splitlines())
    assert "1 of 18 images are unreadable" in broken.stdout and listed.split("/")[1] in broken.stdout


def test_describe_layout_error_exits_2_without_traceback(tmp_path: Path, capsys) -> None:
    assert utils.run_main(datasets.main, ["--dataset", "dtd", "--data_dir", str(tmp_path / "nowhere"), "--fold", "1"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err
    assert utils.run_main(datasets.main, ["--dataset", "kth_tips2", "--data_dir", str(tmp_path), "--fold", "9"]) == 2


def test_describe_synthtex_in_process(capsys) -> None:
    assert datasets.main(["--dataset", "synthtex", "--no_open_check"]) == 0
    out = capsys.readouterr().out
    assert "8 classes" in out and "train      768  96/96" in out


# --------------------------------------------------------------------------------------------
# synthtex
# --------------------------------------------------------------------------------------------
def synthtex_arrays(samples: list[tuple[int, int]], size: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([np.asarray(datasets.render_synthtex(key, size)) for key, _ in samples])
    return images.astype(np.float32) / 255, np.array([label for _, label in samples])


def power_spectrum_features(images: np.ndarray, radii: int = 6, angles: int = 12) -> np.ndarray:
    """Second-order statistics: the power spectrum (the Fourier transform of the autocorrelation),
    binned by frequency and orientation, plus an orientation-invariant summary of each band."""
    grey = images.mean(-1)
    grey = grey - grey.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey), axes=(1, 2))) ** 2
    n = grey.shape[1]
    yy, xx = np.mgrid[0:n, 0:n] - n // 2
    radius, angle = np.hypot(yy, xx), np.mod(np.arctan2(yy, xx), np.pi)
    valid = (radius > 0) & (radius <= n // 2)
    r_bin = np.minimum((radius / (n // 2 + 1) * radii).astype(int), radii - 1)
    a_bin = np.minimum((angle / np.pi * angles).astype(int), angles - 1)
    bins = (r_bin * angles + a_bin)[valid]
    binned = np.stack([np.bincount(bins, p[valid], minlength=radii * angles) for p in power])
    binned = np.log(binned + 1e-6).reshape(len(images), radii, angles)
    invariant = np.abs(np.fft.rfft(binned - binned.mean(-1, keepdims=True), axis=-1))
    return np.concatenate([binned.reshape(len(images), -1), invariant.reshape(len(images), -1)], axis=1)


def test_synthtex_splits_sizes_and_determinism() -> None:
    one = datasets.load_splits("synthtex", None, 1)
    assert len(one.classes) == 8
    assert (len(one.train), len(one.val), len(one.test)) == (768, 128, 128)
    for split, per_class in (("train", 96), ("val", 16), ("test", 16)):
        assert datasets.class_balance(one.split(split), 8) == (per_class, per_class)
    assert_disjoint(one)
    two = datasets.load_splits("synthtex", "ignored", 2)
    assert not split_keys(one)["train"] & split_keys(two)["train"]     # folds are fresh draws
    key = one.train[5][0]
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    a = np.asarray(datasets.render_synthtex(key, 48))
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    b = np.asarray(datasets.render_synthtex(key, 48))
    assert a.shape == (48, 48, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(datasets.render_synthtex(key + 8, 48)))   # same class, new sample


def test_synthtex_datasets_give_tensors(tmp_path: Path) -> None:
    train_tf = transforms.build_train_transform(32)
    sets, classes = datasets.build_datasets("synthtex", None, 1, train_tf, EVAL_32, cache=True, synthtex_size=37)
    assert classes == list(datasets.SYNTHTEX_CLASSES)
    image, label = sets["val"][3]
    assert image.shape == (3, 32, 32) and label == 3
    assert torch.equal(sets["val"][3][0], image)
    assert sets["train"][0][0].shape == (3, 32, 32)


def test_synthtex_needs_second_order_statistics() -> None:
    """Mean colour (first order) is at chance; the power spectrum (second order) separates the classes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    splits = datasets.load_splits("synthtex", None, 1)
    train_x, train_y = synthtex_arrays(splits.train, 32)
    test_x, test_y = synthtex_arrays(splits.val + splits.test, 32)
    chance = 1 / len(splits.classes)

    mean_rgb = lambda x: x.mean(axis=(1, 2))
    centroids = np.stack([mean_rgb(train_x)[train_y == c].mean(0) for c in range(8)])
    distances = ((mean_rgb(test_x)[:, None] - centroids[None]) ** 2).sum(-1)
    mean_rgb_acc = np.mean(distances.argmin(1) == test_y)

    scaler = StandardScaler().fit(power_spectrum_features(train_x))
    classifier = LogisticRegression(C=0.1, max_iter=2000).fit(
        scaler.transform(power_spectrum_features(train_x)), train_y)
    spectrum_acc = np.mean(classifier.predict(scaler.transform(power_spectrum_features(test_x))) == test_y)

    assert mean_rgb_acc < chance + 0.1, mean_rgb_acc
    assert spectrum_acc > 3 * chance, spectrum_acc


# --------------------------------------------------------------------------------------------
# Reliability: what the checker and train.py both refuse or report
# --------------------------------------------------------------------------------------------
def test_a_thin_strip_is_capped_before_resizing(tmp_path: Path, capsys) -> None:
    """A 127-byte 2 x 4000 PNG used to become 37 x 74000 (at 256 px: 256 x 512000, 1.3 GB)."""
    root = fixtures.make_imagefolder(tmp_path / "data", classes=2)
    strip = root / "train" / "class_0" / "strip.png"
    Image.new("RGB", (2, 4000), (200, 10, 10)).save(strip)
    assert strip.stat().st_size < 200
    assert loading.decode_image(str(strip), 37).size == (37, 370)
    assert loading.decode_image(str(strip), None).size == (2, 20)
    cached = loading.ImageListDataset([(str(strip), 0)], None, cache=True, decode_size=37)
    assert cached[0][0].size == (37, 370) and cached.cache[0].size == (37, 370)
    assert datasets.main(["--dataset", "imagefolder", "--data_dir", str(root), "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "more than 10 times longer than wide" in out and f"{strip}: 2 x 4000" in out


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A phone photo stored sideways (EXIF orientation 6: rotate 90 degrees clockwise to view)."""
    stored = Image.new("RGB", (60, 30), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 30, 30))          # the stored image's left half is white
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    upright = loading.decode_image(str(path), None)
    assert upright.size == (30, 60)
    top, bottom = np.asarray(upright)[:30].mean(), np.asarray(upright)[30:].mean()
    assert top > 200 and bottom < 50                          # the white half is now on top
    # --exif off (the upstream presets): as stored, as the paper code's PIL open + convert decodes it.
    as_stored = loading.decode_image(str(path), None, exif=False)
    assert as_stored.size == (60, 30) and np.asarray(as_stored)[:, :30].mean() > 200
    data = loading.ImageListDataset([(str(path), 0)], None, cache=True, exif=False)
    assert data[0][0].size == (60, 30)
    sets, _ = datasets.build_datasets("imagefolder", write_one_image_folder(tmp_path / "folder", path), 1, None, None,
                                      exif=False)
    assert {sets[s][0][0].size for s in ("train", "val")} == {(60, 30)}


def write_one_image_folder(root: Path, image: Path) -> Path:
    """imagefolder with the same image as each of two classes' only train and val image."""
    import shutil
    for split in ("train", "val"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            shutil.copy(image, root / split / name / image.name)
    return root


def test_dtd_paths_with_dots_are_normalised(tmp_path: Path) -> None:
    root = fixtures.make_dtd(tmp_path / "dtd")
    split = root / "labels" / "train1.txt"
    lines = split.read_text().splitlines()
    moved = f"banded/../{lines[-1]}"          # a zigzagged image written through banded/
    split.write_text("\n".join(lines[:-1] + [moved]) + "\n")
    splits = datasets.load_splits("dtd", root, 1)
    path, label = splits.train[-1]
    assert ".." not in path and splits.classes[label] == lines[-1].split("/")[0] == "zigzagged"
    (root / "labels" / "val1.txt").write_text((root / "labels" / "val1.txt").read_text() + moved + "\n")
    with pytest.raises(datasets.DataLayoutError, match="in both the train and the val split"):
        datasets.load_splits("dtd", root, 1)


def test_imagefolder_val_without_class_folders_is_refused_by_both(tmp_path: Path, capsys) -> None:
    root = fixtures.make_imagefolder(tmp_path / "data", classes=2)
    for folder in (root / "val").iterdir():
        shutil.rmtree(folder)
    (root / "val" / "a.png").write_bytes((root / "train" / "class_0" / "train_0.png").read_bytes())
    assert utils.run_main(datasets.main, ["--dataset", "imagefolder", "--data_dir", str(root)]) == 2
    checker = capsys.readouterr().err
    assert f"no class folders in {root / 'val'}" in checker
    import train   # the entry point, in this process
    assert utils.run_main(train.main, ["--dataset", "imagefolder", "--data_dir", str(root),
                                       "--run_dir", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err == checker
    assert not (tmp_path / "runs").exists()


def test_single_class_dataset_is_refused(tmp_path: Path) -> None:
    root = fixtures.make_imagefolder(tmp_path / "data", classes=1)
    with pytest.raises(datasets.DataLayoutError, match="only one class"):
        datasets.load_splits("imagefolder", root, 1)


def test_checker_reports_gifs_dangling_links_and_classes_missing_from_val(tmp_path: Path, capsys) -> None:
    root = fixtures.make_imagefolder(tmp_path / "data", classes=3)
    fixtures.class_image(0, 99).save(root / "train" / "class_0" / "extra.gif")
    (root / "train" / "class_1" / "photo.heic").write_bytes(b"\0" * 10)
    (root / "train" / "class_2" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    shutil.rmtree(root / "val" / "class_2")
    splits = datasets.load_splits("imagefolder", root, 1)
    assert str(root / "train" / "class_0" / "extra.gif") in {p for p, _ in splits.train}   # read, not skipped
    assert datasets.main(["--dataset", "imagefolder", "--data_dir", str(root), "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "1 class(es) have no val image" in out and "class_2" in out
    assert "2 file(s) beside the images are not used" in out
    assert "photo.heic: not an image format read here (.heic)" in out
    assert "gone.png: a symbolic link to nothing" in out
    assert "all 23 images open" in out          # 12 + 1 gif train, 4 val, 6 test
