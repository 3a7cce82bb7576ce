"""Builders of tiny datasets in each protocol's official on-disk format, for the tests.

Usage:
    from fixtures import make_dtd, make_imagenet_folder
    root = make_dtd(tmp_path / "dtd")                        # 3 classes x 6 JPEGs, 10 official-style folds
    root = make_imagenet_folder(tmp_path / "imagenet", classes=3, train_per_class=8, val_per_class=4)

Images are small (32-48 px) and class-dependent (each class has its own stripe orientation and
colour), so a model can learn them. The full_size_*_index builders write the official index
files at their real sizes with empty image files: enough for load_splits, which opens no image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

DTD_CLASSES = ("banded", "dotted", "zigzagged")
FMD_CLASSES = ("fabric", "glass", "wood")
KTH_MATERIALS = ("aluminium_foil", "cork", "wool")
KTH_SAMPLES = ("a", "b", "c", "d")


def class_image(label: int, index: int, size: int = 40) -> Image.Image:
    """A size x size RGB image whose stripe angle and colour depend on the class, with per-image noise."""
    rng = np.random.default_rng([label, index, size])
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = label * np.pi / 5 + rng.uniform(-0.1, 0.1)
    stripes = 0.5 + 0.5 * np.sin((x * np.cos(theta) + y * np.sin(theta)) * 0.6 + rng.uniform(0, 6.3))
    colour = np.array([(label * 0.37) % 1.0, (label * 0.61 + 0.3) % 1.0, (label * 0.83 + 0.6) % 1.0])
    image = stripes[..., None] * colour + rng.uniform(0, 0.15, (size, size, 3))
    return Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))


def write_image(path: Path, label: int, index: int, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    class_image(label, index, size).save(path)
    return path


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def corrupt(path: Path) -> Path:
    """Overwrite an image with bytes no decoder accepts (keeping its name)."""
    path.write_bytes(b"this is not an image" * 10)
    return path


def make_dtd(root: Path, classes: int = 3, per_class: int = 6, folds: int = 10, size: int = 40) -> Path:
    """DTD layout: images/<class>/<class>_NNNN.jpg and labels/{train,val,test}{k}.txt.

    Like the real release, every fold splits each class in equal thirds (here 2/2/2 for 40/40/40).
    """
    names = [DTD_CLASSES[i] if i < len(DTD_CLASSES) else f"class{i:02d}" for i in range(classes)]
    files = {name: [f"{name}/{name}_{i:04d}.jpg" for i in range(1, per_class + 1)] for name in names}
    for label, name in enumerate(names):
        for i, rel in enumerate(files[name]):
            write_image(root / "images" / rel, label, i, size)
    third = per_class // 3
    for fold in range(1, folds + 1):
        rng = np.random.default_rng(fold)
        parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for name in names:
            order = rng.permutation(per_class)
            for j, split in enumerate(parts):
                parts[split] += [files[name][i] for i in order[j * third:(j + 1) * third]]
        for split, lines in parts.items():
            write_lines(root / "labels" / f"{split}{fold}.txt", lines)
    return root


def make_fmd(root: Path, classes: int = 3, per_class: int = 10, size: int = 40) -> Path:
    """FMD layout: image/<class>/<class>_moderate_NNN_new.jpg."""
    for label in range(classes):
        name = FMD_CLASSES[label] if label < len(FMD_CLASSES) else f"material{label:02d}"
        for i in range(1, per_class + 1):
            write_image(root / "image" / name / f"{name}_moderate_{i:03d}_new.jpg", label, i, size)
    return root


def make_kth_tips2(root: Path, materials: int = 3, per_sample: int = 3, size: int = 40) -> Path:
    """KTH-TIPS2-b layout: <material>/sample_{a,b,c,d}/*.png."""
    for label in range(materials):
        name = KTH_MATERIALS[label] if label < len(KTH_MATERIALS) else f"material{label:02d}"
        for s, sample in enumerate(KTH_SAMPLES):
            for i in range(1, per_sample + 1):
                rel = f"{name}/sample_{sample}/{label + 1}{sample}-scale_{i}_im_1_col.png"
                write_image(root / rel, label, s * 100 + i, size)
    return root


def write_cub_index(cub: Path, class_names: list[str], image_paths: list[str], labels: list[int],
                    is_train: list[int]) -> None:
    ids = range(1, len(image_paths) + 1)
    write_lines(cub / "classes.txt", [f"{i} {name}" for i, name in enumerate(class_names, 1)])
    write_lines(cub / "images.txt", [f"{i} {p}" for i, p in zip(ids, image_paths)])
    write_lines(cub / "image_class_labels.txt", [f"{i} {c}" for i, c in zip(ids, labels)])
    write_lines(cub / "train_test_split.txt", [f"{i} {t}" for i, t in zip(ids, is_train)])


def make_cub(root: Path, classes: int = 3, train_per_class: int = 5, test_per_class: int = 4,
             size: int = 40) -> Path:
    """CUB-200-2011 layout under root/CUB_200_2011 (returned): the four index files and images/."""
    cub = root / "CUB_200_2011"
    names = [f"{c:03d}.Bird_{c:03d}" for c in range(1, classes + 1)]
    paths, labels, is_train = [], [], []
    for c, name in enumerate(names, 1):
        for i in range(train_per_class + test_per_class):
            rel = f"{name}/Bird_{c:03d}_{i:04d}.jpg"
            write_image(cub / "images" / rel, c - 1, i, size)
            paths.append(rel)
            labels.append(c)
            is_train.append(1 if i < train_per_class else 0)
    write_cub_index(cub, names, paths, labels, is_train)
    return cub


def save_flowers_mats(root: Path, labels: np.ndarray, trnid: np.ndarray, valid: np.ndarray,
                      tstid: np.ndarray) -> None:
    """imagelabels.mat and setid.mat with the official keys, 1 x N row vectors, 1-based."""
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(root / "imagelabels.mat"), {"labels": labels.astype(np.uint8)[None, :]})
    scipy.io.savemat(str(root / "setid.mat"), {"trnid": trnid.astype(np.uint16)[None, :],
                                                "valid": valid.astype(np.uint16)[None, :],
                                                "tstid": tstid.astype(np.uint16)[None, :]})


def flowers_ids(class_sizes: list[int], train_per_class: int, val_per_class: int, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels (1-based) of images in a shuffled order, and per-class train/val/rest id lists."""
    labels = np.repeat(np.arange(1, len(class_sizes) + 1), class_sizes)
    labels = np.random.default_rng(seed).permutation(labels)
    trn, val, tst = [], [], []
    for c in range(1, len(class_sizes) + 1):
        ids = list(np.flatnonzero(labels == c) + 1)
        trn += ids[:train_per_class]
        val += ids[train_per_class:train_per_class + val_per_class]
        tst += ids[train_per_class + val_per_class:]
    return labels, np.array(trn), np.array(val), np.array(tst)


def make_flowers(root: Path, classes: int = 3, per_class: int = 8, train_per_class: int = 2,
                 val_per_class: int = 2, size: int = 40) -> Path:
    """Flowers-102 layout: jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat."""
    labels, trn, val, tst = flowers_ids([per_class] * classes, train_per_class, val_per_class)
    for i, label in enumerate(labels, 1):
        write_image(root / "jpg" / f"image_{i:05d}.jpg", int(label) - 1, i, size)
    save_flowers_mats(root, labels, trn, val, tst)
    return root


def make_imagefolder(root: Path, classes: int = 3, train_per_class: int = 4, val_per_class: int = 2,
                     test_per_class: int = 2, size: int = 40) -> Path:
    """train/<class>/*.png, val/<class>/*.png and (test_per_class > 0) test/<class>/*.png."""
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    for s, (split, count) in enumerate(counts.items()):
        for label in range(classes):
            for i in range(count):
                write_image(root / split / f"class_{label}" / f"{split}_{i}.png", label, 100 * s + i, size)
    return root


def make_imagenet_folder(root: Path, classes: int = 3, train_per_class: int = 8, val_per_class: int = 4,
                         size: int = 48) -> Path:
    """ImageNet layout: train/<wnid>/<wnid>_<n>.JPEG and val/<wnid>/ILSVRC2012_val_<n>.JPEG."""
    wnids = [f"n{1440764 + 1000 * c:08d}" for c in range(classes)]
    for label, wnid in enumerate(wnids):
        for i in range(train_per_class):
            write_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", label, i, size)
        for i in range(val_per_class):
            number = label * val_per_class + i + 1
            write_image(root / "val" / wnid / f"ILSVRC2012_val_{number:08d}.JPEG", label, 1000 + i, size)
    return root


def touch_all(paths: list[Path]) -> None:
    """Create empty files (plain open() on str: pathlib is several times slower for 10k files)."""
    for folder in {p.parent for p in paths}:
        folder.mkdir(parents=True, exist_ok=True)
    for path in map(str, paths):
        open(path, "wb").close()


def full_size_dtd_index(root: Path) -> Path:
    """The real DTD shape: 47 classes x 120 images, each fold 40/40/40 per class; empty image files."""
    names = [f"texture{c:02d}" for c in range(47)]
    files = {name: [f"{name}/{name}_{i:04d}.jpg" for i in range(120)] for name in names}
    touch_all([root / "images" / rel for name in names for rel in files[name]])
    for fold in range(1, 11):
        rng = np.random.default_rng(fold)
        parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for name in names:
            order = rng.permutation(120)
            for j, split in enumerate(parts):
                parts[split] += [files[name][i] for i in order[j * 40:(j + 1) * 40]]
        for split, lines in parts.items():
            write_lines(root / "labels" / f"{split}{fold}.txt", lines)
    return root


def full_size_cub_index(root: Path) -> Path:
    """CUB-200-2011's real counts: 11788 images, 200 classes, 5994 train (29-30 a class), 5794 test."""
    cub = root / "CUB_200_2011"
    train_counts = [30] * 194 + [29] * 6
    test_counts = [29] * 194 + [28] * 6
    assert sum(train_counts) == 5994 and sum(test_counts) == 5794
    names = [f"{c:03d}.Bird_{c:03d}" for c in range(1, 201)]
    paths, labels, is_train = [], [], []
    for c, name in enumerate(names, 1):
        n_train, n_test = train_counts[c - 1], test_counts[c - 1]
        for i in range(n_train + n_test):
            paths.append(f"{name}/Bird_{c:03d}_{i:04d}.jpg")
            labels.append(c)
            is_train.append(1 if i < n_train else 0)
    touch_all([cub / "images" / p for p in paths])
    write_cub_index(cub, names, paths, labels, is_train)
    return cub


def full_size_flowers_index(root: Path) -> Path:
    """Flowers-102's real counts: 8189 images, 102 classes, 10 train + 10 val each, 6149 test."""
    class_sizes = [81] * 29 + [80] * 73   # 20 train/val + 61 or 60 test
    assert sum(class_sizes) == 8189
    labels, trn, val, tst = flowers_ids(class_sizes, 10, 10)
    touch_all([root / "jpg" / f"image_{i:05d}.jpg" for i in range(1, len(labels) + 1)])
    save_flowers_mats(root, labels, trn, val, tst)
    return root


def one_error_line(err: str) -> str:
    """The single `error: ...` line a user error prints on stderr (no traceback); fails otherwise."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def refused(main: Callable, argv: Sequence[str], out_dir: Path, capsys) -> str:
    """Run a script's main on argv and check the user-error contract: exit status 2, one `error:`
    line on stderr, nothing written under out_dir. Returns the line."""
    from helpers import utils
    code = utils.run_main(main, list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    line = one_error_line(err)
    assert not any(out_dir.iterdir()), sorted(out_dir.iterdir())
    return line
