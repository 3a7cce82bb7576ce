"""synthtex: procedural textures whose classes differ in where features co-occur.

Usage:
    from helpers.synthtex import render_synthtex, SYNTHTEX_CLASSES
    render_synthtex(0, 128).save("synthtex_0.png")      # sample id 0 (class 0) at 128 x 128

    python -m helpers.synthtex --out synthtex_grid.png  # one image of every class (from the repo root)

The built-in dataset (`--dataset synthtex` in the scripts) that makes the repository runnable
with no download. Each image is a function of its sample id alone; datasets.py assigns the ids of
each fold and split. See docs/DATASETS.md "synthtex" for what the classes are.
"""
from __future__ import annotations

import argparse
import math
import types
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

# Two families share their ingredients (two coloured motif layers over a noise or checker
# background, with colours, phases, scales and orientations drawn at random); within a family the
# classes differ only in how the second layer is placed relative to the first. Every class is
# symmetric under a horizontal flip, so flip augmentation never turns one class into another.
SYNTHTEX_CLASSES = (
    "dots_horizontal_pairs",   # each B dot beside an A dot, left or right
    "dots_vertical_pairs",     # ... above or below
    "dots_diagonal_pairs",     # ... along either diagonal
    "dots_unpaired",           # B dots placed independently of A dots
    "stripes_parallel",        # B stripes parallel to A, in the gaps between them
    "stripes_cored",           # B stripes parallel to A, inside them (a thinner core)
    "stripes_oblique",         # B stripes at +-45 degrees to A
    "stripes_crossed",         # B stripes at 90 degrees to A
)
SYNTHTEX_PER_CLASS: Mapping[str, int] = types.MappingProxyType({"train": 96, "val": 16, "test": 16})
SYNTHTEX_SEED_TAG = 0x5EED7E  # separates synthtex's streams from any other use of the same ids
MIN_RENDER_SIZE = 64           # smaller images are drawn larger and box-filtered down (anti-aliasing)


def synthtex_samples_per_fold() -> int:
    return sum(SYNTHTEX_PER_CLASS.values()) * len(SYNTHTEX_CLASSES)


def synthtex_label(key: int) -> int:
    return key % len(SYNTHTEX_CLASSES)


def render_synthtex(key: int, size: int = 128) -> Image.Image:
    """The RGB texture of sample id `key` at size x size; the same key always gives the same image."""
    rng = np.random.default_rng([SYNTHTEX_SEED_TAG, int(key)])
    label = synthtex_label(key)
    factor = max(1, math.ceil(MIN_RENDER_SIZE / size))
    n = size * factor
    background, colour_a, colour_b = distinct_colours(rng)
    image = background_texture(rng, n, background)
    layer_a, layer_b = (dot_layers if label < 4 else stripe_layers)(label, rng, n)
    image += layer_a[..., None] * (colour_a - image)
    image += layer_b[..., None] * (colour_b - image)
    image += (rng.random(image.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(0.06)
    pixels = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    result = Image.fromarray(pixels)
    return result.reduce(factor) if factor > 1 else result


def distinct_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background and the two layer colours: jittered shades of fixed roles (grey, warm A, cool B).

    Fully random colours made the classes hard to learn from a few thousand images (TwistNet-18
    stayed near 20% after 150 steps at 32 px; jittered roles reach 66%), and colour carries no
    class information either way: every class draws from the same three distributions.
    """
    def jitter(base: tuple[float, float, float]) -> np.ndarray:
        return np.clip(np.float32(base) + rng.uniform(-0.15, 0.15, 3).astype(np.float32), 0.0, 1.0)

    return jitter((0.5, 0.5, 0.5)), jitter((0.85, 0.25, 0.1)), jitter((0.1, 0.3, 0.85))


def background_texture(rng: np.random.Generator, n: int, colour: np.ndarray) -> np.ndarray:
    """A faint nuisance texture: 1/f^alpha noise of a random spectrum, or a rotated checkerboard."""
    pattern = spectral_noise(rng, n) if rng.random() < 0.7 else checkerboard(rng, n)
    tint = rng.uniform(0.5, 1.0, 3).astype(np.float32) * np.float32(rng.uniform(0.03, 0.1))
    return colour + pattern[..., None] * tint


def spectral_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    alpha = rng.uniform(0.0, 2.5)  # 0 white, 1 pink, 2 brown, and in between
    freq = np.fft.fftfreq(n)
    radius = np.hypot(freq[:, None], freq[None, :])
    radius[0, 0] = 1.0
    spectrum = np.fft.rfft2(rng.standard_normal((n, n))) * radius[:, : n // 2 + 1] ** (-alpha / 2)
    spectrum[0, 0] = 0.0
    noise = np.fft.irfft2(spectrum, s=(n, n))
    return (noise / (noise.std() + 1e-8)).astype(np.float32)


def checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    period = n / rng.uniform(3.0, 9.0)
    theta = rng.uniform(0.0, np.pi)
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    u = (x * np.cos(theta) + y * np.sin(theta)) / period
    v = (y * np.cos(theta) - x * np.sin(theta)) / period
    phase_u, phase_v = rng.uniform(0.0, 2 * np.pi, 2)
    return np.sign(np.sin(np.pi * u + phase_u) * np.sin(np.pi * v + phase_v)).astype(np.float32)


def jittered_lattice(rng: np.random.Generator, n: int, cells: int, jitter: float) -> np.ndarray:
    """cells x cells points on a randomly offset square lattice, each moved by up to jitter cells."""
    step = n / cells
    centres = (np.arange(cells) + 0.5) * step
    gx, gy = np.meshgrid(centres, centres)
    points = np.stack([gx.ravel(), gy.ravel()], axis=1) + rng.uniform(0.0, step, 2)
    points += rng.uniform(-jitter, jitter, points.shape) * step
    return points % n


def paint_motifs(n: int, centres: np.ndarray, radius: float, square: bool) -> np.ndarray:
    """Soft-edged discs (or squares) at `centres` on an n x n torus, so the texture is stationary."""
    reach = int(math.ceil(radius)) + 1
    offsets = np.arange(-reach, reach + 1)
    xs = np.round(centres[:, 0]).astype(np.int64)[:, None] + offsets      # (motifs, window)
    ys = np.round(centres[:, 1]).astype(np.int64)[:, None] + offsets
    dx = (xs - centres[:, :1])[:, None, :]
    dy = (ys - centres[:, 1:])[:, :, None]
    dist = np.maximum(np.abs(dx), np.abs(dy)) if square else np.hypot(dx, dy)
    values = np.clip(radius + 0.5 - dist, 0.0, 1.0).astype(np.float32)
    mask = np.zeros((n, n), np.float32)
    # maximum.at, not assignment: overlapping windows must keep the larger value, not the last.
    np.maximum.at(mask, ((ys % n)[:, :, None], (xs % n)[:, None, :]), values)
    return mask


def dot_layers(label: int, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    # Coarse on purpose: a 32 px ResNet input is 8 x 8 after the stem, so motifs must span pixels.
    cells = int(rng.integers(3, 5))
    step = n / cells
    a = jittered_lattice(rng, n, cells, 0.2)
    radius = step * rng.uniform(0.13, 0.18)
    gap = step * rng.uniform(0.40, 0.48)  # > 2 * radius: a pair never merges into one blob
    signs = rng.choice([-1.0, 1.0], a.shape)
    if label == 0:
        b = a + signs * [gap, 0.0]
    elif label == 1:
        b = a + signs * [0.0, gap]
    elif label == 2:
        b = a + signs * gap / math.sqrt(2)
    else:
        b = jittered_lattice(rng, n, cells, 0.5)
    square = bool(rng.random() < 0.5)
    return paint_motifs(n, a, radius, square), paint_motifs(n, b % n, radius, square)


def stripe_mask(n: int, theta: float, period: float, phase: float, width: float) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    u = x * np.cos(theta) + y * np.sin(theta)
    dist = np.abs(((u / period - phase) % 1.0) - 0.5) * period
    return np.clip(width / 2 - dist + 0.5, 0.0, 1.0).astype(np.float32)


def stripe_layers(label: int, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    period = n / rng.uniform(2.5, 4.5)
    theta = rng.uniform(0.0, np.pi)
    width = period * rng.uniform(0.22, 0.32)
    phase = rng.uniform()
    a = stripe_mask(n, theta, period, phase, width)
    if label == 4:
        b = stripe_mask(n, theta, period, phase + 0.5, width * rng.uniform(0.7, 1.0))
    elif label == 5:
        b = stripe_mask(n, theta, period, phase, width * rng.uniform(0.35, 0.55))
    elif label == 6:
        turn = rng.choice([-1.0, 1.0]) * np.pi / 4
        b = stripe_mask(n, theta + turn, period, rng.uniform(), width * rng.uniform(0.7, 1.0))
    else:
        b = stripe_mask(n, theta + np.pi / 2, period, rng.uniform(), width * rng.uniform(0.7, 1.0))
    return a, b


def class_grid(size: int = 96, per_class: int = 2) -> Image.Image:
    """per_class rows of one image per class, side by side: a quick look at the dataset."""
    n = len(SYNTHTEX_CLASSES)
    grid = Image.new("RGB", (n * size, per_class * size))
    for row in range(per_class):
        for label in range(n):
            grid.paste(render_synthtex(row * n + label, size), (label * size, row * size))
    return grid


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Save a grid of synthtex images, one column per class.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="synthtex_grid.png", help="PNG to write")
    parser.add_argument("--size", type=int, default=96, help="pixels per image")
    parser.add_argument("--rows", type=int, default=2, help="images per class")
    args = parser.parse_args(argv)
    class_grid(args.size, args.rows).save(args.out)
    print(f"wrote {args.out}: classes {', '.join(SYNTHTEX_CLASSES)} from left to right")


if __name__ == "__main__":
    main()
