"""Dataset protocols of TwistNet-2D: deterministic splits, the datasets of a fold, a layout checker.

Usage:
    python datasets.py --dataset dtd --data_dir data/dtd --fold 1      # describe and check a fold
    python datasets.py --dataset synthtex                                # the built-in textures
    python datasets.py --dataset cub200 --data_dir data/CUB_200_2011 --fold 3 --no_open_check
    python datasets.py --dataset fmd --data_dir data/fmd --fold 2 --split_protocol paper_code --seed 42
    python datasets.py --download dtd --data_dir data/dtd    # fetch, verify, unpack, check (also fmd,
                                                             # kth_tips2, cub200, flowers102)

    from datasets import build_datasets
    from helpers.loading import collate_skip_unreadable
    sets, classes = build_datasets("dtd", "data/dtd", 1, train_tf, eval_tf, cache=True)   # native resolution
    sets, classes = build_datasets("dtd", "data/dtd", 1, train_tf, eval_tf, decode_size=256)  # fast path
    loader = DataLoader(sets["train"], batch_size=32, collate_fn=collate_skip_unreadable)
    for images, labels, n_skipped in loader: ...

The describe entry point prints the class count, the split sizes, the per-class balance of each
split, and opens every image (exit 1 if any is unreadable, 2 if the layout itself is wrong).
--download fetches the official release (resuming a cut download, checking size and checksums),
unpacks it into exactly the layout below and ends with the same layout check and table; any
failure is one `error:` line, exit 2, and leaves no half-unpacked --data_dir.

Protocols (`--data_dir` points at the data as its authors distribute it):
    dtd          images/<class>/*.jpg, labels/{train,val,test}{k}.txt    the 10 official splits
    fmd          image/<class>/*.jpg                                     10 seeded 50/50 splits, val carved from train
    kth_tips2    <material>/sample_{a,b,c,d}/*.png (KTH-TIPS2-b)         fold k tests on sample k
    cub200       CUB_200_2011/{images,image_class_labels,train_test_split,classes}.txt, images/
                                                                         official test; fold seeds the val carve
    flowers102   jpg/, imagelabels.mat, setid.mat                        fold 1 official; k > 1 reshuffled
    imagefolder  train/<class>/*, val/<class>/*, optional test/<class>/*  one split
    synthtex     nothing: procedural textures generated in memory        any fold

Every split is a function of (dataset, fold) alone: seeds come from a hash of the two, never from
the global random state, so the training seed cannot change which images are tested. The opt-in
split_protocol 'paper_code' makes the paper code's splits instead (PAPER_CODE_READERS): seeded by
the training seed too, and for FMD 5 folds of 60/20/20 whose test sets overlap. Decoding
and the Dataset classes are in loading.py, the download in download.py.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import types
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from helpers import download, utils
from helpers.loading import (CACHE_MAX_SHORT, IMAGE_EXTENSIONS, MAX_ASPECT_RATIO, UNREADABLE_ERRORS, ImageListDataset,
                             SynthTexDataset, is_image_file)

from helpers.synthtex import SYNTHTEX_CLASSES, SYNTHTEX_PER_CLASS, render_synthtex, synthtex_label, synthtex_samples_per_fold

SPLIT_NAMES = ("train", "val", "test")


class DataNotFoundError(utils.UserError, FileNotFoundError):
    """A dataset folder or file that is not where the protocol expects it."""


class DataLayoutError(utils.UserError, ValueError):
    """A dataset whose files are there but do not follow the protocol (or a bad fold / name)."""


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the scripts know about one protocol; DATASETS below is the one table of them."""
    name: str
    display: str                      # column title in tables and figures
    layout: str                       # what --data_dir must hold, for error messages and --help
    folds: int | None                 # number of folds; None: any k >= 1 (a seeded re-draw)
    reader: Callable[[Path | None, int], "Splits"]
    needs_data_dir: bool = True


SPLIT_PROTOCOLS = ("default", "paper_code")
FMD_VAL_PER_TRAIN = 0.2        # 10 of the 50 training images per class
CARVED_VAL_FRACTION = 0.1      # kth_tips2 and cub200: 10% of each class's training images
KTH_SAMPLES = ("a", "b", "c", "d")


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------
@dataclass
class Splits:
    """Class names and the (sample key, label) pairs of each split.

    A key is an image path (str) for the datasets on disk and an int sample id for synthtex.
    """
    classes: list[str]
    train: list[tuple[Any, int]]
    val: list[tuple[Any, int]]
    test: list[tuple[Any, int]]

    def split(self, name: str) -> list[tuple[Any, int]]:
        return getattr(self, name)

    def check_disjoint(self, dataset: str) -> None:
        """Raise ValueError if a sample sits in two splits (or twice in one)."""
        seen: dict[Any, str] = {}
        for name in SPLIT_NAMES:
            for key, _ in self.split(name):
                if key in seen:
                    raise DataLayoutError(f"{dataset}: sample {key} is in both the {seen[key]} and the {name} "
                                     "split; splits must be disjoint and free of duplicates.")
                seen[key] = name


def dataset_spec(dataset: str) -> DatasetSpec:
    """The protocol's table entry; an unknown name is a DataLayoutError listing the known ones."""
    if dataset not in DATASETS:
        raise DataLayoutError(f"Unknown dataset {dataset!r}; known: {', '.join(DATASETS)}.")
    return DATASETS[dataset]


def num_folds(dataset: str, split_protocol: str = "default") -> int | None:
    """How many folds a protocol has; None when any fold k >= 1 is valid (a seeded re-draw)."""
    if split_protocol == "paper_code" and dataset in PAPER_CODE_FOLDS:
        return PAPER_CODE_FOLDS[dataset]
    return dataset_spec(dataset).folds


def check_split_protocol(split_protocol: str) -> None:
    if split_protocol not in SPLIT_PROTOCOLS:
        raise DataLayoutError(f"Unknown split protocol {split_protocol!r}; choose from {', '.join(SPLIT_PROTOCOLS)}.")


def dataset_display_name(dataset: str) -> str:
    return DATASETS[dataset].display if dataset in DATASETS else dataset


def dataset_sort_key(dataset: str) -> tuple:
    """The paper's column order (the DATASETS table), unknown names last and alphabetical."""
    names = list(DATASETS)
    return (names.index(dataset), "") if dataset in DATASETS else (len(names), dataset)


def check_fold(dataset: str, fold: int, split_protocol: str = "default") -> None:
    limit = num_folds(dataset, split_protocol)
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or fold < 1 \
            or (limit is not None and fold > limit):
        allowed = f"folds 1-{limit}" if limit and limit > 1 else ("only fold 1" if limit == 1 else "folds >= 1")
        under = " under --split_protocol paper_code (the paper code's 5-fold split)" \
            if split_protocol == "paper_code" and dataset in PAPER_CODE_FOLDS else ""
        raise DataLayoutError(f"{dataset} has {allowed}{under}; got fold {fold!r}.")


def fold_rng(dataset: str, fold: int, purpose: str = "") -> np.random.Generator:
    """A generator seeded by (dataset, fold[, purpose]) only.

    sha256 rather than hash(): Python salts str hashes per process, which would make splits
    differ from run to run.
    """
    digest = hashlib.sha256(f"{dataset}/fold{fold}{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def load_splits(dataset: str, data_dir: str | Path | None, fold: int, train_per_class: int | None = None,
                train_fraction: float | None = None, split_protocol: str = "default", seed: int | None = None
                ) -> Splits:
    """The train/val/test samples of one fold of one protocol, checked for layout errors; with
    train_per_class / train_fraction, training on `train_subset` of them (val and test unchanged).

    split_protocol 'paper_code' gives the splits the paper's public code makes (PAPER_CODE_READERS):
    for FMD, KTH-TIPS2-b and CUB they depend on the training `seed` as well (required then), and
    FMD's test sets overlap between folds and seeds. 'default' is ours: a function of (dataset, fold).

    Cheap: lists folders, reads index files and checks that listed files exist, but opens no
    image (`describe` does that). Raises DataNotFoundError (a FileNotFoundError) for a missing folder or file
    and DataLayoutError (a ValueError) for a bad fold, an empty class or an inconsistent index, naming the path and
    what was expected.
    """
    spec = dataset_spec(dataset)
    check_split_protocol(split_protocol)
    check_fold(dataset, fold, split_protocol)
    root = require_data_dir(dataset, data_dir) if spec.needs_data_dir else None
    paper_reader = PAPER_CODE_READERS.get(dataset) if split_protocol == "paper_code" else None
    if paper_reader is not None:
        if seed is None:
            raise ValueError("split_protocol 'paper_code' needs the training seed: the paper code seeds its splits with it")
        splits = paper_reader(root, fold, seed)
    else:
        splits = spec.reader(root, fold)
    check_every_class_trains(dataset, splits)
    check_trainable(dataset, fold, splits)
    splits.check_disjoint(dataset)
    if train_per_class is not None or train_fraction is not None:
        splits.train = train_subset(dataset, fold, splits.train, train_per_class, train_fraction)
    return splits


def train_subset(dataset: str, fold: int, samples: Sequence[tuple[Any, int]], per_class: int | None = None,
                 fraction: float | None = None) -> list[tuple[Any, int]]:
    """The first `per_class` (or round(fraction * n), at least 1) samples of each class in a ranking
    seeded by (dataset, fold, class) alone: never by the training seed, and nested (8 per class lie
    inside 16 per class, 10% inside 25%), for low-data curves."""
    if (per_class is None) == (fraction is None):
        raise ValueError("give exactly one of per_class and fraction")
    by_class: dict[int, list[Any]] = {}
    for key, label in sorted(samples, key=sort_key):
        by_class.setdefault(label, []).append(key)
    subset = []
    for label, keys in by_class.items():
        order = fold_rng(dataset, fold, f"/train_subset/class{label}").permutation(len(keys))
        take = per_class if per_class is not None else max(1, round(fraction * len(keys)))
        subset += [(keys[i], label) for i in order[:take]]
    return sorted(subset, key=sort_key)


def check_every_class_trains(dataset: str, splits: Splits) -> None:
    counts = Counter(label for _, label in splits.train)
    missing = [name for i, name in enumerate(splits.classes) if counts[i] == 0]
    if missing:
        raise DataLayoutError(f"{dataset}: class(es) {', '.join(missing[:5])} have no training images; "
                         "every class needs at least one.")


def check_trainable(dataset: str, fold: int, splits: Splits) -> None:
    """What train.py needs of a fold: two classes or more, and a validation split to select on."""
    if len(splits.classes) < 2:
        raise DataLayoutError(f"{dataset}: only one class ({', '.join(splits.classes)}); classification needs "
                              f"at least two (is --data_dir one level too deep?).")
    if not splits.val:
        raise DataLayoutError(f"{dataset} fold {fold}: the validation split is empty; train.py selects the "
                              f"best epoch on it, so it needs images (each class needs at least 2 training "
                              f"images for a validation image to be carved from them).")


def split_warnings(splits: Splits) -> list[str]:
    """Usable but worth knowing: classes that the validation or test split never shows."""
    notes = []
    for split in ("val", "test"):
        samples = splits.split(split)
        counts = Counter(label for _, label in samples)
        absent = [name for i, name in enumerate(splits.classes) if counts[i] == 0]
        if samples and absent:
            notes.append(f"{len(absent)} class(es) have no {split} image, so their {split} accuracy is "
                         f"undefined: {', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''}")
    return notes


def unused_files(splits: Splits) -> list[tuple[str, str]]:
    """(path, why) of the entries that sit beside a fold's images but are not used: files with an
    extension that is not an image format read here, and symbolic links to nothing."""
    folders = sorted({os.path.dirname(key) for name in SPLIT_NAMES for key, _ in splits.split(name)
                      if isinstance(key, str)})
    found = []
    for folder in folders:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            why = unused_reason(Path(entry.path))
            if why:
                found.append((entry.path, why))
    return found


def unused_reason(path: Path) -> str | None:
    if path.is_symlink() and not path.exists():
        return f"a symbolic link to nothing ({os.readlink(path)})"
    if path.is_file() and path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image format read here ({path.suffix or 'no extension'})"
    return None


def split_fingerprint(classes: Sequence[str], samples_by_split: Mapping[str, Sequence[tuple[Any, int]]],
                      roots: Sequence[str | Path] | None = None) -> dict:
    """What identifies a fold's data without reading an image: the split sizes, a sha256 of the
    class names and every (sample id, label), and a sha256 of the image files' sizes. Image paths
    count relative to the folder that holds them all (or, given the `roots` they were listed
    from, to their own root, so that each root may move on its own), so moving the dataset keeps
    the fingerprint; adding, removing or relabelling an image, another split, or images re-exported
    in place (other file sizes) change it. The sizes cost one stat per file, no image is opened."""
    paths = [key for split in SPLIT_NAMES for key, _ in samples_by_split.get(split, ()) if isinstance(key, str)]
    name_of = relative_namer(paths, roots)
    digest = hashlib.sha256("\n".join(classes).encode())
    for split in SPLIT_NAMES:
        digest.update(f"\n[{split}]".encode())
        for key, label in samples_by_split.get(split, ()):
            digest.update(f"\n{name_of(key) if isinstance(key, str) else key}\t{label}".encode())
    fingerprint = {"sizes": {split: len(samples_by_split.get(split, ())) for split in SPLIT_NAMES},
                   "sha256": digest.hexdigest()}
    if paths:   # synthtex has no files: its sample ids are its content
        fingerprint["file_sizes_sha256"] = file_sizes_digest(paths)
    return fingerprint


def relative_namer(paths: Sequence[str], roots: Sequence[str | Path] | None) -> Callable[[str], str]:
    """path -> its name where the data may move: relative to the paths' common folder, or with
    `roots`, '<k>/<path relative to root k>' for the first root k that holds it."""
    if roots is None:
        base = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0]) if paths else ""
        return lambda path: os.path.relpath(path, base).replace(os.sep, "/")
    prefixes = [str(Path(root)) for root in roots]

    def name(path: str) -> str:
        for k, root in enumerate(prefixes):
            if path.startswith(root.rstrip(os.sep) + os.sep):
                return f"{k}/" + os.path.relpath(path, root).replace(os.sep, "/")
        return path
    return name


def file_sizes_digest(paths: Iterable[str]) -> str:
    """A sha256 of the files' sizes in the given order (-1 for a file that cannot be stat'ed)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            size = os.stat(path).st_size
        except OSError:
            size = -1
        digest.update(f"{size}\n".encode())
    return digest.hexdigest()


def data_difference(saved_classes: Sequence[str], saved: Mapping[str, Any], classes: Sequence[str],
                    current: Mapping[str, Any]) -> str:
    """How two folds' data differ, in words ('' when their fingerprints agree). File sizes count
    only when both fingerprints have them (one written before they were recorded has not)."""
    if list(saved_classes) != list(classes):
        gone, new = sorted(set(saved_classes) - set(classes)), sorted(set(classes) - set(saved_classes))
        detail = "; ".join(filter(None, [f"not any more: {', '.join(gone[:5])}" if gone else "",
                                         f"new: {', '.join(new[:5])}" if new else ""])) or "another order"
        return f"the classes differ ({len(saved_classes)} then, {len(classes)} now; {detail})"
    if dict(saved["sizes"]) != dict(current["sizes"]):
        sizes = ", ".join(f"{s} {saved['sizes'].get(s)} -> {current['sizes'].get(s)}" for s in SPLIT_NAMES
                          if saved["sizes"].get(s) != current["sizes"].get(s))
        return f"the split sizes differ ({sizes})"
    if saved["sha256"] != current["sha256"]:
        return "the splits hold other images (same sizes, other sample ids or labels)"
    before, now = saved.get("file_sizes_sha256"), current.get("file_sizes_sha256")
    if before and now and before != now:
        return ("the image files changed (same names and labels, other file sizes: re-exported or edited "
                "in place?)")
    return ""


# --------------------------------------------------------------------------------------------
# Listing helpers
# --------------------------------------------------------------------------------------------
def layout_hint(dataset: str, root: Path) -> str:
    return f"Expected {DATASETS[dataset].layout} under {root}."


def require_data_dir(dataset: str, data_dir: str | Path | None) -> Path:
    if data_dir is None:
        raise DataLayoutError(f"{dataset} needs --data_dir pointing at the dataset as distributed: {DATASETS[dataset].layout}.")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataNotFoundError(f"{dataset} data folder not found: {root}. {layout_hint(dataset, root)}")
    return root


def require_dir(path: Path, what: str, dataset: str, root: Path) -> Path:
    if not path.is_dir():
        raise DataNotFoundError(f"{what} not found: {path}. {layout_hint(dataset, root)}")
    return path


def require_file(path: Path, what: str, dataset: str, root: Path) -> Path:
    if not path.is_file():
        raise DataNotFoundError(f"{what} not found: {path}. {layout_hint(dataset, root)}")
    return path


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def list_subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_folders(parent: Path, dataset: str, root: Path) -> list[str]:
    classes = list_subdirs(parent)
    if not classes:
        raise DataLayoutError(f"{dataset}: no class folders in {parent}. {layout_hint(dataset, root)}")
    return classes


def images_of_class(folder: Path, dataset: str, root: Path) -> list[Path]:
    images = list_images(folder)
    if not images:
        ignored = [f"{p.name}: {why}" for p in sorted(folder.iterdir()) if (why := unused_reason(p))]
        there = f" It holds only files that are not used: {'; '.join(ignored[:3])}." if ignored else ""
        raise DataLayoutError(f"{dataset}: class folder has no images: {folder} (expected files with one of the "
                              f"extensions {', '.join(sorted(IMAGE_EXTENSIONS))}).{there} {layout_hint(dataset, root)}")
    return images


def require_listed_files_exist(paths: Iterable[str], source: str, dataset: str) -> None:
    # os.path on str, not pathlib: this runs over every listed file (11788 for CUB) on each start.
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataNotFoundError(f"{dataset}: {source} lists {len(missing)} image(s) that do not exist, "
                                f"e.g. {missing[0]}.")


def carve_per_class(samples: Sequence[tuple[Any, int]], count: Callable[[int], int],
                    rng: np.random.Generator) -> tuple[list[tuple[Any, int]], list[tuple[Any, int]]]:
    """Split samples into (kept, carved), taking count(n) random samples of each class of size n.

    Classes are visited in label order and samples sorted first, so the result depends on the
    generator's seed only, not on the order the files were listed in.
    """
    by_class: dict[int, list[Any]] = {}
    for key, label in sorted(samples, key=lambda s: (s[1], str(s[0]))):
        by_class.setdefault(label, []).append(key)
    kept, carved = [], []
    for label in sorted(by_class):
        keys = by_class[label]
        order = rng.permutation(len(keys))
        n_carve = count(len(keys))
        carved += [(keys[i], label) for i in order[:n_carve]]
        kept += [(keys[i], label) for i in order[n_carve:]]
    return sorted(kept, key=sort_key), sorted(carved, key=sort_key)


def sort_key(sample: tuple[Any, int]) -> tuple[int, str]:
    return sample[1], str(sample[0])


def val_count(n_train: int) -> int:
    """Validation images carved from a class with n_train training images (>= 1 left to train)."""
    if n_train < 2:
        return 0
    return min(n_train - 1, max(1, round(CARVED_VAL_FRACTION * n_train)))


# --------------------------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------------------------
def dtd_splits(root: Path, fold: int) -> Splits:
    images = require_dir(root / "images", "DTD image folder", "dtd", root)
    labels_dir = require_dir(root / "labels", "DTD label folder", "dtd", root)
    classes = class_folders(images, "dtd", root)
    for name in classes:
        images_of_class(images / name, "dtd", root)
    index = {name: i for i, name in enumerate(classes)}
    parts = {}
    for split in SPLIT_NAMES:
        path = labels_dir / f"{split}{fold}.txt"
        if not path.is_file():
            raise DataNotFoundError(
                f"DTD split file not found: {path}. DTD has folds 1-10; expected labels/train{{k}}.txt, "
                f"val{{k}}.txt, test{{k}}.txt under {root}.")
        parts[split] = read_dtd_split_file(path, images, index)
    return Splits(classes, parts["train"], parts["val"], parts["test"])


def read_dtd_split_file(path: Path, images: Path, index: Mapping[str, int]) -> list[tuple[str, int]]:
    samples = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        written = line.strip()
        if not written:
            continue
        # Normalised, so that 'a/../b/x.jpg' is labelled b (where the file is) and counts as the
        # same sample as 'b/x.jpg' in the disjointness check.
        rel = os.path.normpath(written).replace(os.sep, "/")
        class_name = rel.split("/", 1)[0]
        if "/" not in rel or class_name not in index or rel.startswith("../") or os.path.isabs(rel):
            raise DataLayoutError(f"DTD split file {path}, line {line_no}: {written!r} is not '<class>/<file>' "
                                  f"with <class> a folder under {images}.")
        samples.append((os.path.join(images, rel), index[class_name]))
    if not samples:
        raise DataLayoutError(f"DTD split file is empty: {path} (expected lines like 'banded/banded_0002.jpg').")
    require_listed_files_exist((p for p, _ in samples), f"split file {path}", "dtd")
    return samples


def fmd_splits(root: Path, fold: int) -> Splits:
    image_dir = require_dir(root / "image", "FMD image folder", "fmd", root)
    classes = class_folders(image_dir, "fmd", root)
    samples = [(str(p), label) for label, name in enumerate(classes)
               for p in images_of_class(image_dir / name, "fmd", root)]
    rng = fold_rng("fmd", fold)
    train_pool, test = carve_per_class(samples, lambda n: n // 2, rng)
    train, val = carve_per_class(train_pool, fmd_val_count, rng)
    return Splits(classes, train, val, test)


def fmd_val_count(n_train: int) -> int:
    """Validation images carved from a class's n_train training images: 10 of 50 on the real data."""
    return min(n_train - 1, round(FMD_VAL_PER_TRAIN * n_train)) if n_train > 1 else 0


def kth_tips2_root(root: Path) -> Path:
    # The archive unpacks to KTH-TIPS2-b/; accept the folder above it too.
    nested = root / "KTH-TIPS2-b"
    return nested if nested.is_dir() else root


def kth_tips2_splits(root: Path, fold: int) -> Splits:
    root = kth_tips2_root(root)
    classes = class_folders(root, "kth_tips2", root)
    test_sample = KTH_SAMPLES[fold - 1]
    pool, test = [], []
    for label, material in enumerate(classes):
        for sample in KTH_SAMPLES:
            folder = require_dir(root / material / f"sample_{sample}",
                                 f"KTH-TIPS2-b sample folder of material {material!r}", "kth_tips2", root)
            files = [(str(p), label) for p in images_of_class(folder, "kth_tips2", root)]
            (test if sample == test_sample else pool).extend(files)
    train, val = carve_per_class(pool, val_count, fold_rng("kth_tips2", fold))
    return Splits(classes, train, val, sorted(test, key=sort_key))


def cub200_root(root: Path) -> Path:
    for candidate in (root / "CUB_200_2011", root):
        if (candidate / "images.txt").is_file():
            return candidate
    raise DataNotFoundError(f"CUB-200-2011 index not found: neither {root / 'CUB_200_2011' / 'images.txt'} nor "
                            f"{root / 'images.txt'} exists. {layout_hint('cub200', root)}")


def read_id_table(path: Path, dataset: str, root: Path) -> dict[int, str]:
    """Read a CUB '<id> <value>' file into {id: value}."""
    require_file(path, "CUB index file", dataset, root)
    table = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataLayoutError(f"CUB index file {path}, line {line_no}: expected '<id> <value>', got {line!r}.")
        table[int(parts[0])] = parts[1].strip()
    return table


def cub200_splits(root: Path, fold: int) -> Splits:
    root = cub200_root(root)
    paths = read_id_table(root / "images.txt", "cub200", root)
    labels = read_id_table(root / "image_class_labels.txt", "cub200", root)
    is_train = read_id_table(root / "train_test_split.txt", "cub200", root)
    class_table = read_id_table(root / "classes.txt", "cub200", root)
    image_dir = require_dir(root / "images", "CUB image folder", "cub200", root)
    if not (paths.keys() == labels.keys() == is_train.keys()):
        raise DataLayoutError(f"CUB index files under {root} disagree on the image ids: images.txt, "
                         "image_class_labels.txt and train_test_split.txt must list the same ids.")
    class_ids = sorted(class_table)
    if class_ids != list(range(1, len(class_ids) + 1)):
        raise DataLayoutError(f"CUB {root / 'classes.txt'}: class ids must be 1..N without gaps.")
    official: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for image_id in sorted(paths):
        label = int(labels[image_id]) - 1
        if not 0 <= label < len(class_ids):
            raise DataLayoutError(f"CUB {root / 'image_class_labels.txt'}: image {image_id} has class "
                             f"{labels[image_id]}, outside 1..{len(class_ids)}.")
        split = "train" if is_train[image_id].strip() == "1" else "test"
        official[split].append((os.path.join(image_dir, paths[image_id]), label))
    require_listed_files_exist((p for p, _ in official["train"] + official["test"]),
                               f"{root / 'images.txt'}", "cub200")
    train, val = carve_per_class(official["train"], val_count, fold_rng("cub200", fold))
    classes = [class_table[i] for i in class_ids]
    return Splits(classes, train, val, sorted(official["test"], key=sort_key))


def load_mat_vector(path: Path, key: str, dataset: str, root: Path) -> np.ndarray:
    import scipy.io  # only flowers102 needs scipy; keep the import off the common path

    require_file(path, "Flowers-102 index file", dataset, root)
    content = scipy.io.loadmat(str(path))
    if key not in content:
        raise DataLayoutError(f"Flowers-102 {path} has no key {key!r} (found: "
                         f"{', '.join(k for k in content if not k.startswith('__'))}).")
    return np.asarray(content[key]).astype(np.int64).ravel()


def flowers102_splits(root: Path, fold: int) -> Splits:
    labels = load_mat_vector(root / "imagelabels.mat", "labels", "flowers102", root)
    setid = {split: load_mat_vector(root / "setid.mat", key, "flowers102", root)
             for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))}
    image_dir = require_dir(root / "jpg", "Flowers-102 image folder", "flowers102", root)
    n_images, n_classes = len(labels), int(labels.max())
    present = set(labels.tolist())
    empty = [c for c in range(1, n_classes + 1) if c not in present]
    if labels.min() < 1 or empty:
        raise DataLayoutError(f"Flowers-102 {root / 'imagelabels.mat'}: labels must be 1..{n_classes} with every class "
                         f"present; classes without images: {empty[:5]}.")
    for split, ids in setid.items():
        if ids.size == 0 or ids.min() < 1 or ids.max() > n_images:
            raise DataLayoutError(f"Flowers-102 {root / 'setid.mat'}: {split} ids must be within 1..{n_images}.")
    path_of = [os.path.join(image_dir, f"image_{i:05d}.jpg") for i in range(1, n_images + 1)]
    listed = np.concatenate(list(setid.values()))
    require_listed_files_exist((path_of[i - 1] for i in listed), f"{root / 'setid.mat'}", "flowers102")
    official = {split: sorted(((path_of[i - 1], int(labels[i - 1]) - 1) for i in ids), key=sort_key)
                for split, ids in setid.items()}
    classes = [f"flower_{c:03d}" for c in range(1, n_classes + 1)]
    if fold == 1:
        return Splits(classes, official["train"], official["val"], official["test"])
    return Splits(classes, *reshuffle_keeping_class_counts(official, fold))


def reshuffle_keeping_class_counts(official: Mapping[str, list[tuple[str, int]]], fold: int
                                   ) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[tuple[str, int]]]:
    """Redraw train/val/test from all images with the official number of each class in each split.

    On the real data that is 10 train, 10 val and the rest test for every class, hence exactly the
    official 1020/1020/6149.
    """
    train_counts = Counter(label for _, label in official["train"])
    val_counts = Counter(label for _, label in official["val"])
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in sorted((s for split in SPLIT_NAMES for s in official[split]), key=sort_key):
        by_class.setdefault(sample[1], []).append(sample)
    rng = fold_rng("flowers102", fold)
    train, val, test = [], [], []
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))
        n_train, n_val = train_counts[label], val_counts[label]
        train += [members[i] for i in order[:n_train]]
        val += [members[i] for i in order[n_train:n_train + n_val]]
        test += [members[i] for i in order[n_train + n_val:]]
    return sorted(train, key=sort_key), sorted(val, key=sort_key), sorted(test, key=sort_key)


def imagefolder_splits(root: Path, fold: int) -> Splits:
    train_dir = require_dir(root / "train", "imagefolder train folder", "imagefolder", root)
    val_dir = require_dir(root / "val", "imagefolder val folder", "imagefolder", root)
    classes = class_folders(train_dir, "imagefolder", root)
    test_dir = root / "test"
    for split_dir in (val_dir, test_dir) if test_dir.is_dir() else (val_dir,):
        class_folders(split_dir, "imagefolder", root)   # an empty val/ would silently leave no validation
    parts = {"train": folder_samples(train_dir, classes, root), "val": folder_samples(val_dir, classes, root)}
    parts["test"] = folder_samples(test_dir, classes, root) if test_dir.is_dir() else []
    return Splits(classes, parts["train"], parts["val"], parts["test"])


def folder_samples(split_dir: Path, classes: list[str], root: Path) -> list[tuple[str, int]]:
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in list_subdirs(split_dir) if name not in index]
    if unknown:
        raise DataLayoutError(f"imagefolder: {split_dir} has class folder(s) {', '.join(unknown[:5])} that "
                         f"{root / 'train'} lacks; the classes are the folders of train/.")
    return [(str(p), index[name]) for name in list_subdirs(split_dir)
            for p in images_of_class(split_dir / name, "imagefolder", root)]


def synthtex_splits(root: Path | None, fold: int) -> Splits:
    """synthtex: fold k owns sample ids [(k-1) * N, k * N): folds are disjoint draws from one infinite family."""
    n_classes = len(SYNTHTEX_CLASSES)
    start = (fold - 1) * synthtex_samples_per_fold()
    parts = {}
    for split in SPLIT_NAMES:
        count = SYNTHTEX_PER_CLASS[split] * n_classes
        parts[split] = [(key, synthtex_label(key)) for key in range(start, start + count)]
        start += count
    return Splits(list(SYNTHTEX_CLASSES), parts["train"], parts["val"], parts["test"])


# --------------------------------------------------------------------------------------------
# The paper code's splits (--split_protocol paper_code), written from reading
# github.com/junbolian/TwistNet-2D datasets.py at b223241 (the published tables). Each draws with
# Python's random.Random(seed + fold), one generator shared by the classes in sorted order, where
# seed is the training seed. random.shuffle permutes by position alone, so shuffling indices gives
# the permutation the paper code applies to its list of paths.
# --------------------------------------------------------------------------------------------
PAPER_CODE_FMD_PARTS = 5


def paper_code_rng(seed: int, fold: int) -> random.Random:
    return random.Random(seed + fold)


def shuffled(items: Sequence[Any], rng: random.Random) -> list[Any]:
    order = list(range(len(items)))
    rng.shuffle(order)
    return [items[i] for i in order]


def suffix_files(folder: Path, dataset: str, root: Path, suffixes: Sequence[str]) -> list[list[Path]]:
    """The folder's images with each suffix (case-sensitive, as the paper code's glob), each group by name."""
    images = images_of_class(folder, dataset, root)
    return [sorted(p for p in images if p.suffix == suffix) for suffix in suffixes]


def fmd_paper_code_splits(root: Path, fold: int, seed: int) -> Splits:
    """Per class (sorted): its .jpg and .png files sorted by name, shuffled, cut into 5 parts of n // 5
    (the remainder joins part 5); part `fold` is test, the next one (5 wraps to 1) val, the other
    three train: 60/20/20. A new generator per fold, so test sets of two folds (or seeds) overlap."""
    image_dir = require_dir(root / "image", "FMD image folder", "fmd", root)
    classes = class_folders(image_dir, "fmd", root)
    rng = paper_code_rng(seed, fold)
    test_part, val_part = fold - 1, fold % PAPER_CODE_FMD_PARTS
    parts: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        files = sorted(sum(suffix_files(image_dir / name, "fmd", root, (".jpg", ".png")), []), key=str)
        part_size = len(files) // PAPER_CODE_FMD_PARTS
        if part_size == 0:
            raise DataLayoutError(f"fmd: class folder {image_dir / name} has {len(files)} .jpg/.png image(s); the "
                                  f"paper code's 5-part split needs at least {PAPER_CODE_FMD_PARTS}.")
        for i, path in enumerate(shuffled(files, rng)):
            part = min(i // part_size, PAPER_CODE_FMD_PARTS - 1)
            split = "test" if part == test_part else "val" if part == val_part else "train"
            parts[split].append((str(path), label))
    return Splits(classes, *(sorted(parts[s], key=sort_key) for s in SPLIT_NAMES))


def kth_tips2_paper_code_splits(root: Path, fold: int, seed: int) -> Splits:
    """Fold k tests on sample d, c, b, a for k = 1..4 (ours: a, b, c, d); per material (sorted) the
    other samples' images are shuffled and the first max(1, n // 10) become val. The paper code lists a
    sample's .png then .jpg files in the file system's order (glob, unsorted); here each group is
    sorted by name, so the val carve is the paper code's on a file system that lists names in order."""
    root = kth_tips2_root(root)
    classes = class_folders(root, "kth_tips2", root)
    test_sample = f"sample_{KTH_SAMPLES[len(KTH_SAMPLES) - fold]}"
    rng = paper_code_rng(seed, fold)
    train, val, test = [], [], []
    for label, material in enumerate(classes):
        pool = []
        for sample in list_subdirs(root / material):
            files = sum(suffix_files(root / material / sample, "kth_tips2", root, (".png", ".jpg")), [])
            (test if sample == test_sample else pool).extend((str(p), label) for p in files)
        pool = shuffled(pool, rng)
        n_val = max(1, len(pool) // 10)
        val += pool[:n_val]
        train += pool[n_val:]
    return Splits(classes, sorted(train, key=sort_key), sorted(val, key=sort_key), sorted(test, key=sort_key))


def cub200_paper_code_splits(root: Path, fold: int, seed: int) -> Splits:
    """The official test set; the official training images, in images.txt order, shuffled as one list
    (not per class), the first n // 10 become val."""
    official = cub200_splits(root, fold)   # the layout checks, the classes and the official test set
    cub = cub200_root(root)
    paths = read_id_table(cub / "images.txt", "cub200", cub)
    labels = read_id_table(cub / "image_class_labels.txt", "cub200", cub)
    is_train = read_id_table(cub / "train_test_split.txt", "cub200", cub)
    image_dir = cub / "images"
    pool = [(os.path.join(image_dir, paths[i]), int(labels[i]) - 1) for i in paths if is_train[i].strip() == "1"]
    pool = shuffled(pool, paper_code_rng(seed, fold))
    n_val = len(pool) // 10
    return Splits(official.classes, sorted(pool[n_val:], key=sort_key), sorted(pool[:n_val], key=sort_key),
                  official.test)


def flowers102_paper_code_splits(root: Path, fold: int, seed: int) -> Splits:
    """The paper code reads the official setid.mat for every fold (ours reshuffles folds > 1)."""
    return flowers102_splits(root, 1)


# DTD is read from the official label files by both; imagefolder and synthtex are not in the paper code.
PAPER_CODE_READERS: Mapping[str, Callable[[Path, int, int], Splits]] = types.MappingProxyType({
    "fmd": fmd_paper_code_splits, "kth_tips2": kth_tips2_paper_code_splits, "cub200": cub200_paper_code_splits,
    "flowers102": flowers102_paper_code_splits})
PAPER_CODE_FOLDS = {"fmd": PAPER_CODE_FMD_PARTS}


DATASETS: Mapping[str, DatasetSpec] = types.MappingProxyType({spec.name: spec for spec in (
    # In the paper's column order: tables and figures sort datasets by it.
    DatasetSpec("dtd", "DTD", "images/<class>/*.jpg and labels/train{k}.txt, val{k}.txt, test{k}.txt (k = 1..10)",
                10, dtd_splits),
    DatasetSpec("fmd", "FMD", "image/<class>/*.jpg (10 classes x 100 images)", 10, fmd_splits),
    DatasetSpec("kth_tips2", "KTH-TIPS2", "<material>/sample_a, sample_b, sample_c, sample_d/*.png (KTH-TIPS2-b)",
                4, kth_tips2_splits),
    DatasetSpec("cub200", "CUB-200", "CUB_200_2011/ (or its contents): images.txt, image_class_labels.txt, "
                "train_test_split.txt, classes.txt, images/", None, cub200_splits),
    DatasetSpec("flowers102", "Flowers-102", "jpg/image_00001.jpg ..., imagelabels.mat, setid.mat", None,
                flowers102_splits),
    DatasetSpec("imagefolder", "ImageFolder", "train/<class>/*, val/<class>/* and optionally test/<class>/*",
                1, imagefolder_splits),
    DatasetSpec("synthtex", "SynthTex", "nothing (generated in memory)", None, synthtex_splits,
                needs_data_dir=False),
)})
DATASET_NAMES = tuple(DATASETS)


def build_datasets(dataset: str, data_dir: str | Path | None, fold: int, train_transform: Callable | None,
                   eval_transform: Callable | None, cache: bool = False, cache_size: int | None = None,
                   synthtex_size: int = 128, decode_size: int | None = None,
                   cache_max_short: int | None = CACHE_MAX_SHORT, train_per_class: int | None = None,
                   train_fraction: float | None = None, split_protocol: str = "default", seed: int | None = None,
                   exif: bool = True) -> tuple[dict[str, Dataset], list[str]]:
    """({"train", "val", "test"} datasets, class names) of one fold; items are (image, label) or None.

    Images are decoded at native resolution unless decode_size is given: then every image is
    resized on decode so its shorter side is decode_size (the fast path; cache_size is its
    former name, still accepted). cache=True keeps the decoded images in memory, per DataLoader
    worker, shrunk to a shorter side of cache_max_short if larger (see ImageListDataset for the
    memory it takes). synthtex renders at synthtex_size instead and is always cached. The test
    dataset is empty for an imagefolder without test/. train_per_class / train_fraction, split_protocol
    and seed: see load_splits. exif=False leaves EXIF orientation unapplied (the paper code's decode).
    """
    if cache_size is not None and decode_size is not None and cache_size != decode_size:
        raise ValueError(f"cache_size ({cache_size}) is the former name of decode_size ({decode_size}); give one.")
    decode_size = decode_size if decode_size is not None else cache_size
    splits = load_splits(dataset, data_dir, fold, train_per_class, train_fraction, split_protocol, seed)
    sets: dict[str, Dataset] = {}
    for split in SPLIT_NAMES:
        transform = train_transform if split == "train" else eval_transform
        if dataset == "synthtex":
            # Always cached: rendering costs more than decoding, and a fold is small (640 images,
            # 125 MB at 256 px).
            sets[split] = SynthTexDataset(splits.split(split), transform, synthtex_size, cache=True)
        else:
            sets[split] = ImageListDataset(splits.split(split), transform, cache, decode_size, cache_max_short,
                                           exif=exif)
    return sets, splits.classes


# --------------------------------------------------------------------------------------------
# Unlabelled images (self-supervised pretraining)
# --------------------------------------------------------------------------------------------
def list_images_recursive(folder: str | Path) -> list[Path]:
    """Every image file under `folder`, at any depth, in a deterministic order (folders sorted,
    files sorted within each); hidden files and folders are skipped.

    Symlinked folders are followed, each real folder once, so a folder of links (say to an
    ImageNet train/ and a DTD images/) lists their union.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataNotFoundError(f"Image folder not found: {root}")
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:        # a link loop, or a second link to a folder already listed
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(path for path in (Path(dirpath, name) for name in sorted(filenames)) if is_image_file(path))
    return found


def unlabelled_dataset(folders: str | Path | Sequence[str | Path], transform: Callable | None,
                       cache: bool = False, decode_size: int | None = None) -> ImageListDataset:
    """Every image under the folder(s), searched recursively, as (image, 0) items; labels (class
    folders) are ignored. An unreadable image gives None, which collate_skip_unreadable skips
    and counts. A folder without any image is a DataNotFoundError."""
    folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
    paths: list[Path] = []
    for folder in folders:
        images = list_images_recursive(folder)
        if not images:
            raise DataNotFoundError(f"No images under {folder} (searched recursively for "
                                    f"{', '.join(sorted(IMAGE_EXTENSIONS))}).")
        paths += images
    return ImageListDataset([(str(path), 0) for path in paths], transform, cache, decode_size)


# --------------------------------------------------------------------------------------------
# describe: the command line
# --------------------------------------------------------------------------------------------
def class_balance(samples: Sequence[tuple[Any, int]], n_classes: int) -> tuple[int, int]:
    counts = Counter(label for _, label in samples)
    per_class = [counts[c] for c in range(n_classes)]
    return min(per_class), max(per_class)


def describe_splits(dataset: str, data_dir: str | Path | None, fold: int, splits: Splits) -> str:
    where = f" ({data_dir})" if dataset != "synthtex" else ""
    lines = [f"{dataset} fold {fold}{where}: {len(splits.classes)} classes",
             f"{'split':<6} {'images':>7}  per class min/max"]
    for split in SPLIT_NAMES:
        samples = splits.split(split)
        balance = "%d/%d" % class_balance(samples, len(splits.classes)) if samples else "-"
        lines.append(f"{split:<6} {len(samples):>7}  {balance}")
    lines.append(f"{'total':<6} {sum(len(splits.split(s)) for s in SPLIT_NAMES):>7}")
    return "\n".join(lines)


def check_image(key: Any) -> tuple[str | None, tuple[int, int] | None]:
    """(None if the sample decodes, else the reason it does not; its width and height)."""
    if isinstance(key, int):
        return None, render_synthtex(key, 32).size
    try:
        with Image.open(key) as image:
            size = image.size
            # A reduced-scale decode still parses the whole compressed stream, so it catches
            # truncated and corrupt files at a fraction of the cost.
            image.draft("RGB", (64, 64))
            image.load()
        return None, size
    except UNREADABLE_ERRORS as error:
        return f"{type(error).__name__}: {error}", None


def check_images(keys: Sequence[Any], workers: int, progress: bool) -> list[tuple[str | None, tuple[int, int] | None]]:
    """check_image of every key, in order."""
    # PIL releases the GIL while decoding, so threads give a real speed-up here.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(utils.progress(pool.map(check_image, keys), total=len(keys), desc="opening images",
                                   unit="img", disable=not progress))


def is_extreme_aspect(size: tuple[int, int] | None) -> bool:
    return size is not None and max(size) > MAX_ASPECT_RATIO * max(1, min(size))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Describe one fold of a dataset and check that every image in it opens; or download one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", choices=DATASET_NAMES, help="the protocol to describe (required unless --download)")
    parser.add_argument("--data_dir", default=None, help="dataset root as distributed (unused for synthtex)")
    parser.add_argument("--download", choices=tuple(download.DOWNLOADS), default=None,
                        help="fetch the official release into --data_dir (resumable, verified), then check its layout")
    parser.add_argument("--base_url", default=None,
                        help=f"fetch the release files from this URL instead (a mirror); also ${download.DOWNLOAD_BASE_URL_ENV}")
    parser.add_argument("--keep_archives", action="store_true", help="keep the downloaded archives after unpacking")
    parser.add_argument("--download_timeout", type=float, default=download.DEADLINE_MIN, metavar="MINUTES",
                        help="give up a download that has not finished after this long (a re-run resumes it)")
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--split_protocol", default="default", choices=SPLIT_PROTOCOLS,
                        help="default: ours, a function of (dataset, fold); paper_code: the splits the paper's "
                             "code makes (FMD, KTH-TIPS2-b, CUB: seeded by --seed too; "
                             "docs/DATASETS.md \"The paper code's splits\")")
    parser.add_argument("--seed", type=int, default=42, help="training seed: only paper_code splits depend on it")
    parser.add_argument("--no_open_check", action="store_true", help="only check the layout, open no image")
    parser.add_argument("--workers", type=int, default=8, help="threads that open images")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.download:
        if args.dataset not in (None, args.download) or not args.data_dir:
            parser.error("--download NAME needs --data_dir (and no other --dataset)")
        if not args.download_timeout > 0:
            parser.error(f"--download_timeout {args.download_timeout:g}: minutes, more than 0")
        args.dataset, args.no_open_check = args.download, True   # the checksums vouch for the images
    elif not args.dataset:
        parser.error("--dataset is required (or --download NAME)")
    if args.download:
        download.download_dataset(args.download, args.data_dir, lambda root: load_splits(args.download, root, 1),
                                  args.base_url, args.keep_archives, deadline_s=args.download_timeout * 60)
    splits = load_splits(args.dataset, args.data_dir, args.fold, split_protocol=args.split_protocol, seed=args.seed)
    print(describe_splits(args.dataset, args.data_dir, args.fold, splits))
    if args.split_protocol == "paper_code" and args.dataset in PAPER_CODE_READERS:
        print(f"split protocol paper_code (the paper code's splits for fold {args.fold}, seed {args.seed})")
    # The same notes train.py prints when it starts.
    for note in split_warnings(splits):
        print(f"warning: {note}")
    unused = unused_files(splits)
    if unused:
        print(f"warning: {len(unused)} file(s) beside the images are not used:")
        for path, why in unused:
            print(f"  {path}: {why}")
    if args.no_open_check:
        return 0
    keys = [key for split in SPLIT_NAMES for key, _ in splits.split(split)]
    checks = check_images(keys, max(1, args.workers), not args.no_progress)
    extreme = [(key, size) for key, (_, size) in zip(keys, checks) if is_extreme_aspect(size)]
    if extreme:
        print(f"warning: {len(extreme)} image(s) are more than {MAX_ASPECT_RATIO:g} times longer than wide; "
              f"they are centre-cropped to {MAX_ASPECT_RATIO:g}:1 when loaded:")
        for key, (width, height) in extreme:
            print(f"  {key}: {width} x {height}")
    bad = [(key, reason) for key, (reason, _) in zip(keys, checks) if reason is not None]
    if bad:
        print(f"{len(bad)} of {len(keys)} images are unreadable:")
        for key, reason in bad:
            print(f"  {key}: {reason}")
        return 1
    print(f"all {len(keys)} images open")
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
