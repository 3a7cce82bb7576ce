"""Fidelity to the paper's code: STCI initialisation, ImageNet weights for the ablation variants,
native-resolution bicubic crops and the decode cache.

Covered: stci_init="upstream" gives the paper code's weight distributions (std per tensor within
six standard errors of the expected value, the twist kernel not directional) and "paper" stays
the default; twistnet18_imagenet.pt loads non-strictly into each ablation variant with a
mapped / skipped / left-at-init report; train and eval crops are taken from the full-resolution
image with bicubic interpolation, decode_size keeps the reduced-size fast path, and the cache
keeps native resolution up to its cap.

    .venv/bin/python -m pytest -q tests/test_fidelity.py
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision.transforms import v2

import datasets
import fixtures
import models
import transforms
from helpers import loading

torch.set_num_threads(2)

STCI_BLOCKS = ("layer3.0", "layer3.1", "layer4.0", "layer4.1")
R = 8


def _seeded(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return models.build_model(name, 47, pretrained=False, verbose=False, **kwargs)


def _assert_std(values: torch.Tensor, expected: float, what: str) -> None:
    """The sample std of n normal draws has a standard error of about std / sqrt(2 n); six of them
    make a chance failure a one-in-a-billion event while a wrong fan-out (a factor of 2 for the
    batched heads) is off by dozens."""
    n = values.numel()
    tolerance = 6 * expected / math.sqrt(2 * n)
    got = values.std().item()
    assert abs(got - expected) < tolerance, f"{what}: std {got:.4f}, expected {expected:.4f} +- {tolerance:.4f} (n={n})"
    assert abs(values.mean().item()) < 6 * expected / math.sqrt(n), f"{what}: mean {values.mean().item():.4f}"


def _stci(model: nn.Module, block: str) -> models.MultiHeadSTCI:
    return models.twist_blocks(model)[block].stci


# --------------------------------------------------------------------------------------------
# STCI initialisation
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def upstream() -> nn.Module:
    return _seeded("twistnet18", stci_init="upstream")


def test_upstream_init_has_the_paper_code_distributions(upstream: nn.Module) -> None:
    # Measured on the paper's code itself (junbolian/TwistNet-2D, TwistNet(num_classes=47), mean
    # over 5 seeds): reduce 0.502 / 0.499, twist 0.166 / 0.165, proj 0.0884 / 0.0624 (layer3 / 4).
    for block in STCI_BLOCKS:
        stci = _stci(upstream, block)
        width = stci.proj.weight.shape[0]
        for d in range(4):   # per head: the paper's code builds one conv per head
            _assert_std(stci.reduce.weight[d * R:(d + 1) * R].detach(), math.sqrt(2 / R), f"{block} reduce head {d}")
        _assert_std(stci.proj.weight.detach(), math.sqrt(2 / width), f"{block} proj")
        assert torch.equal(stci.twist_scale.detach(), torch.ones(4 * R))
    assert abs(math.sqrt(2 / 256) - 0.0884) < 1e-4 and abs(math.sqrt(2 / 512) - 0.0625) < 1e-4
    # 288 values per block: pooled over the four blocks for a tighter bound.
    twist = torch.cat([_stci(upstream, b).twist.weight.detach().flatten() for b in STCI_BLOCKS])
    _assert_std(twist, math.sqrt(2 / (9 * R)), "twist")
    assert abs(math.sqrt(2 / (9 * R)) - 0.1667) < 1e-4


def _directional_energy(kernel: torch.Tensor) -> float:
    """Share of the kernels' squared weight at the centre and each head's neighbour tap."""
    kernel = kernel.detach().view(4, R, 3, 3)
    offsets = [(1, 0), (1, 1), (0, 1), (-1, 1)]
    taps = sum(kernel[d, :, 1, 1].pow(2).sum() + kernel[d, :, 1 + dy, 1 + dx].pow(2).sum()
               for d, (dx, dy) in enumerate(offsets))
    return float(taps / kernel.pow(2).sum())


def test_upstream_twist_kernel_is_not_directional(upstream: nn.Module) -> None:
    paper = _seeded("twistnet18")
    for block in STCI_BLOCKS:
        assert _directional_energy(_stci(paper, block).twist.weight) == 1.0
    # Random kernels: 2 of 9 taps hold 2/9 of the energy on average. Pooled over 4 x 32 kernels of
    # 9 chi-square(1) taps, the share has a standard deviation of ~0.02; 0.12-0.33 is > 5 of them.
    share = np.mean([_directional_energy(_stci(upstream, b).twist.weight) for b in STCI_BLOCKS])
    assert 0.12 < share < 0.33, share
    kernel = _stci(upstream, "layer3.0").twist.weight.detach()
    assert (kernel != 0).all()                       # every tap drawn, none structurally zero


def test_paper_init_is_the_default_and_unchanged() -> None:
    default, paper = _seeded("twistnet18"), _seeded("twistnet18", stci_init="paper")
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), paper.state_dict().values()))
    stci = _stci(default, "layer3.0")
    assert stci.stci_init == "paper"
    # PyTorch's default conv init: kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)), std 1/sqrt(3 C).
    _assert_std(stci.reduce.weight.detach(), 1 / math.sqrt(3 * 256), "paper reduce")
    _assert_std(stci.proj.weight.detach(), 0.01, "paper proj")


@pytest.mark.parametrize("name", ["twistnet18_no_spiral", "twistnet18_no_ais", "twistnet18_first_order"])
def test_stci_init_reaches_the_variants(name: str) -> None:
    model = _seeded(name, stci_init="upstream")
    for blk in models.twist_blocks(model).values():
        _assert_std(blk.stci.reduce.weight.detach(), math.sqrt(2 / R), f"{name} reduce")
        assert blk.stci.twist is None or _directional_energy(blk.stci.twist.weight) < 0.5


def test_unknown_stci_init_is_a_clear_error() -> None:
    for name in ("twistnet18", "twistnet18_first_order"):
        with pytest.raises(models.ModelConfigError, match="stci_init must be one of paper, upstream"):
            _seeded(name, stci_init="kaiming")


# --------------------------------------------------------------------------------------------
# ImageNet weights for the ablation variants
# --------------------------------------------------------------------------------------------
@pytest.fixture
def twistnet18_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """weights/twistnet18_imagenet.pt (1000 classes, every tensor moved off its init) in the
    current directory; models.py 'lives' in an empty folder so no real weights file interferes."""
    torch.manual_seed(5)
    state = {k: (v + 0.5 if v.is_floating_point() else v + 3)
             for k, v in models.build_model("twistnet18", 1000, verbose=False).state_dict().items()}
    (tmp_path / "weights").mkdir()
    torch.save(state, tmp_path / "weights" / "twistnet18_imagenet.pt")
    (tmp_path / "script").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "__file__", str(tmp_path / "script" / "models.py"))
    return state


def _report_counts(text: str) -> tuple[int, int, int]:
    match = re.search(r"mapped:\s+(\d+) tensors.*?skipped:\s+(\d+) tensors.*?left at init:\s+(\d+) tensors", text, re.S)
    assert match, text
    return tuple(map(int, match.groups()))


@pytest.mark.parametrize("name, unused_part", [("twistnet18_no_ais", ".stci.ais."),
                                               ("twistnet18_no_spiral", ".stci.twist"),
                                               ("twistnet18_first_order", ".stci.")])
def test_ablation_variant_loads_twistnet18_weights(twistnet18_weights: dict, name: str, unused_part: str,
                                                   capsys: pytest.CaptureFixture, recwarn) -> None:
    torch.manual_seed(0)
    model = models.build_model(name, 47, pretrained=True)
    out = capsys.readouterr().out
    own = model.state_dict()
    assert "twistnet18_imagenet.pt" in out and "non-strictly" in out
    # Everything but the 1000 -> 47 classifier comes from the file; nothing is left at init.
    assert _report_counts(out) == (len(own) - 2, 2, 0)
    for key, value in own.items():
        if not key.startswith("fc."):
            assert torch.equal(value, twistnet18_weights[key]), key
    unused = [k for k in twistnet18_weights if k not in own]
    assert unused and all(unused_part in k or k.endswith(".gate") for k in unused)
    assert f"not used:      {len(unused):4d} source tensors" in out
    assert not [w for w in recwarn if "Falling back to ResNet-18" in str(w.message)]


def test_ablation_variant_own_file_wins(twistnet18_weights: dict, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(1)
    own_state = models.build_model("twistnet18_no_ais", 47, verbose=False).state_dict()
    torch.save(own_state, Path("weights") / "twistnet18_no_ais_imagenet.pt")
    model = models.build_model("twistnet18_no_ais", 47, pretrained=True)
    assert "twistnet18_no_ais_imagenet.pt" in capsys.readouterr().out
    assert all(torch.equal(v, own_state[k]) for k, v in model.state_dict().items())


def test_variant_with_other_hyper_parameters_skips_mismatched_stci(twistnet18_weights: dict,
                                                                   capsys: pytest.CaptureFixture) -> None:
    model = models.build_model("twistnet18_no_ais", 1000, pretrained=True, r=4)
    own = model.state_dict()
    mismatched = [k for k in own if own[k].shape != twistnet18_weights[k].shape]
    # Per block: reduce conv, its BN (4), twist kernel and scale, GroupNorm (2), projection conv.
    assert len(mismatched) == 4 * 10
    assert _report_counts(capsys.readouterr().out) == (len(own) - len(mismatched), len(mismatched), 0)


# --------------------------------------------------------------------------------------------
# Native-resolution bicubic crops, the decode_size fast path, the cache cap
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """imagefolder whose first item in every split is a 512 x 512 PNG of per-pixel noise: detail at
    the pixel scale, which a 256 px copy cannot hold, so a crop shows which copy it was cut from.
    A second class (one small grey image) makes the folder a valid classification dataset."""
    root = tmp_path_factory.mktemp("big")
    noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    for split in ("train", "val", "test"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
        Image.fromarray(noise).save(root / split / "a" / "noise.png")
        Image.new("RGB", (16, 16), (128, 128, 128)).save(root / split / "b" / "grey.png")
    return root


def _normalised(image: Image.Image) -> torch.Tensor:
    return v2.Compose(transforms.to_normalised_tensor(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD))(image)


def _train_crop(sets: dict, transform: v2.Compose, seed: int) -> tuple[torch.Tensor, dict]:
    """The train item under `seed`, and the crop box RandomResizedCrop drew for it."""
    torch.manual_seed(seed)
    out, _ = sets["train"][0]
    source = sets["train"].load(0)
    torch.manual_seed(seed)
    return out, transform.transforms[0].make_params([source])


def test_train_crop_is_bicubic_from_the_native_image(big_image_root: Path) -> None:
    native = Image.open(big_image_root / "train" / "a" / "noise.png").convert("RGB")
    train_tf = transforms.build_train_transform(128, hflip=0, randaug_n=0, scale=(0.08, 0.08))
    sets, _ = datasets.build_datasets("imagefolder", big_image_root, 1, train_tf, None)
    assert sets["train"].load(0).size == (512, 512)          # decoded at native resolution
    half = native.resize((256, 256), Image.Resampling.BICUBIC)
    for seed in range(3):
        out, box = _train_crop(sets, train_tf, seed)
        top, left, h, w = box["top"], box["left"], box["height"], box["width"]
        assert 0.07 < h * w / 512 ** 2 < 0.09                 # scale 0.08: a ~145 px region
        region = (left, top, left + w, top + h)
        expected = _normalised(native.crop(region).resize((128, 128), Image.Resampling.BICUBIC))
        assert torch.equal(out, expected)
        # The same region of a 256 px copy is ~72 px, upsampled 1.8x: the pixel noise is gone.
        # Measured: std 0.93 (native) vs 0.47 (copy) in normalised units, mean difference 0.6-0.7.
        from_copy = _normalised(half.crop(tuple(c // 2 for c in region)).resize((128, 128), Image.Resampling.BICUBIC))
        assert out.std() > 1.6 * from_copy.std()
        assert (out - from_copy).abs().mean() > 0.4
        # Bilinear from the native image differs too: bicubic is what the default does.
        bilinear = _normalised(native.crop(region).resize((128, 128), Image.Resampling.BILINEAR))
        assert not torch.equal(out, bilinear)


def test_eval_crop_is_bicubic_from_the_native_image(big_image_root: Path) -> None:
    native = Image.open(big_image_root / "val" / "a" / "noise.png").convert("RGB")
    eval_tf = transforms.build_eval_transform(64)
    sets, _ = datasets.build_datasets("imagefolder", big_image_root, 1, None, eval_tf)
    out, _ = sets["val"][0]
    resized = native.resize((73, 73), Image.Resampling.BICUBIC)          # eval_resize_size(64) = 73
    assert torch.equal(out, _normalised(v2.CenterCrop(64)(resized)))
    # What the former default did: shrink to the 73 px eval size on decode (bilinear), then crop.
    # Both average ~7 x 7 pixels, so they differ little (measured 0.026 mean), but they differ.
    old = native.resize((73, 73), Image.Resampling.BILINEAR)
    assert (out - _normalised(v2.CenterCrop(64)(old))).abs().mean() > 0.01
    # At 448 px the eval resize is 512, the native size: the crop is the image's own pixels.
    sets, _ = datasets.build_datasets("imagefolder", big_image_root, 1, None, transforms.build_eval_transform(448))
    out, _ = sets["val"][0]
    assert torch.equal(out, _normalised(native.crop((32, 32, 480, 480))))


def test_decode_size_keeps_the_fast_path(big_image_root: Path, tmp_path: Path) -> None:
    train_tf = transforms.build_train_transform(64, hflip=0, randaug_n=0, scale=(0.08, 0.08))
    sets, _ = datasets.build_datasets("imagefolder", big_image_root, 1, train_tf, None, decode_size=256)
    small = sets["train"].load(0)
    assert small.size == (256, 256)
    out, box = _train_crop(sets, train_tf, seed=0)
    region = (box["left"], box["top"], box["left"] + box["width"], box["top"] + box["height"])
    assert torch.equal(out, _normalised(small.crop(region).resize((64, 64), Image.Resampling.BICUBIC)))
    # cache_size, the parameter's former name, still selects it.
    legacy, _ = datasets.build_datasets("imagefolder", big_image_root, 1, None, None, cache_size=256)
    assert legacy["train"].load(0).size == (256, 256)
    # A JPEG over twice decode_size is decoded at a reduced DCT scale (PIL's draft), then resized.
    jpeg = tmp_path / "big.jpg"
    Image.open(big_image_root / "train" / "a" / "noise.png").save(jpeg)
    with Image.open(jpeg) as image:
        image.draft("RGB", (64, 64))
        assert image.size == (64, 64)                         # 1/8 scale: what decode_image reads
    assert loading.decode_image(str(jpeg), 64).size == (64, 64)
    assert loading.decode_image(str(jpeg)).size == (512, 512)


def test_cache_keeps_native_resolution_up_to_the_cap(tmp_path: Path) -> None:
    sizes = {"small.png": (640, 480), "large.png": (800, 600)}
    for name, size in sizes.items():
        fixtures.class_image(1, 0, 64).resize(size).save(tmp_path / name)
    samples = [(str(tmp_path / name), 0) for name in sizes]
    capped = loading.ImageListDataset(samples, None, cache=True)
    assert loading.CACHE_MAX_SHORT == 512
    first = [capped[i][0] for i in range(2)]
    assert [im.size for im in first] == [(640, 480), (682, 512)]   # 800 * 512 / 600 = 682.7, as Resize rounds
    assert [capped[i][0] for i in range(2)] == first               # the same image on every epoch
    assert capped[0][0].tobytes() == Image.open(samples[0][0]).convert("RGB").tobytes()
    uncapped = loading.ImageListDataset(samples, None, cache=True, cache_max_short=None)
    assert uncapped[1][0].size == (800, 600)
    uncached = loading.ImageListDataset(samples, None)
    assert uncached[1][0].size == (800, 600) and uncached.cache is None


def test_interpolation_option() -> None:
    crop = transforms.build_train_transform(32).transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.interpolation == v2.InterpolationMode.BICUBIC
    assert transforms.build_eval_transform(32).transforms[0].interpolation == v2.InterpolationMode.BICUBIC
    assert transforms.build_eval_transform(32, interpolation="bilinear").transforms[0].interpolation \
        == v2.InterpolationMode.BILINEAR
    with pytest.raises(ValueError, match="bicubic, bilinear"):
        transforms.build_train_transform(32, interpolation="nearest")
