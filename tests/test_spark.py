"""spark.py: masks, the mask-aware encoder (no leak, statistics over visible positions),
decoder, loss, weight export; and datasets' unlabelled image folders.

Usage:
    .venv/bin/python -m pytest -q tests/test_spark.py
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import datasets
import fixtures
import model_tools
import models
import spark
from synthtex import render_synthtex

R = spark.DOWNSAMPLE_RATIO
SE_AND_STCI = ("twistnet18", "seresnet18")


def build(name: str, dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    """A registry model whose norm layers look trained: fresh ones (unit scale, zero shift, timm's
    zero-initialised last BatchNorm of each block) would hide a missing re-mask or a wrong pool."""
    torch.manual_seed(0)
    model = models.build_model(name, 10, verbose=False, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.to(dtype)


def mask(batch: int, h: int, w: int, seed: int = 0, ratio: float = 0.6) -> torch.Tensor:
    return spark.random_active_mask(batch, h, w, ratio, torch.Generator().manual_seed(seed))


def images(batch: int, height: int, width: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def visible_at(active: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    """The mask at feat's resolution, broadcast over its channels."""
    return spark.upsample_mask(active, *feat.shape[-2:]).expand_as(feat)


@contextlib.contextmanager
def copies_of_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Like model_tools.capture, but a copy: later in-place ops (ReLU, residual adds) must not edit it."""
    store: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: store.__setitem__(name, out.detach().clone()))
               for name, m in modules.items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def spatial_outputs(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of the feature path whose output is a map (all but the pooled AIS/SE parts)."""
    pooled = (".ais", ".se", ".fc", "global_pool")
    return {name: m for name, m in model.named_modules()
            if name.split(".")[0] in spark.FEATURE_PATH and not any(p in f".{name}" for p in pooled)}


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h, w, ratio, visible", [
    (7, 7, 0.6, 20),     # round(19.6): SparK's 224 px grid
    (2, 2, 0.6, 2),      # round(1.6)
    (3, 3, 0.6, 4),      # round(3.6)
    (7, 7, 0.75, 12),    # round(12.25)
    (4, 6, 0.5, 12),
    (2, 2, 0.9, 1),      # round(0.4) = 0, but one patch stays visible
    (2, 2, 0.05, 3),     # round(3.8) = 4, but one patch is masked
])
def test_mask_has_exactly_the_requested_visible_patches(h: int, w: int, ratio: float, visible: int) -> None:
    active = mask(64, h, w, ratio=ratio)
    assert active.dtype == torch.bool and active.shape == (64, 1, h, w)
    assert spark.num_visible(h, w, ratio) == visible
    assert active.flatten(1).sum(1).tolist() == [visible] * 64
    assert len({tuple(a.flatten().tolist()) for a in active}) > 1          # random per image
    assert torch.equal(active, mask(64, h, w, ratio=ratio))                 # a function of the generator
    counts = active.float().mean(0).flatten()                               # every patch gets masked
    assert (counts > 0).all() and (counts < 1).all()


def test_mask_errors_and_upsampling() -> None:
    for ratio in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="mask_ratio"):
            spark.num_visible(3, 3, ratio)
    with pytest.raises(ValueError, match="at least 64 px"):
        spark.num_visible(1, 1, 0.6)
    active = torch.tensor([[True, False], [False, True]]).view(1, 1, 2, 2)
    up = spark.upsample_mask(active, 4, 6)
    assert up.shape == (1, 1, 4, 6)
    assert up[0, 0].int().tolist() == [[1, 1, 1, 0, 0, 0]] * 2 + [[0, 0, 0, 1, 1, 1]] * 2
    with pytest.raises(ValueError, match="whole multiple"):
        spark.upsample_mask(active, 5, 6)


# --------------------------------------------------------------------------------------------
# The encoder: no leak, zero at masked positions
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["twistnet18", "resnet18", "seresnet18"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_leak_from_masked_pixels(name: str, mode: str) -> None:
    encoder = spark.SparkEncoder(build(name, torch.float64))
    active = mask(2, 3, 3)
    x = images(2, 96, 96, torch.float64)
    if mode == "eval":   # non-trivial running statistics first
        for seed in range(3):
            encoder(images(2, 96, 96, torch.float64, seed=10 + seed), active)
        encoder.eval()
    pixels_visible = spark.upsample_mask(active, 96, 96).expand_as(x)
    other = torch.where(pixels_visible, x, 100 * images(2, 96, 96, torch.float64, seed=2))
    feats, feats_other = encoder(x, active), encoder(other, active)
    assert [f.shape[1] for f in feats] == encoder.feature_channels == [64, 128, 256, 512]
    assert [f.shape[-1] for f in feats] == [24, 12, 6, 3]
    for f, g in zip(feats, feats_other):
        visible = visible_at(active, f)
        assert torch.equal(f[visible], g[visible])                   # bit-identical
        assert not f[~visible].any() and not g[~visible].any()       # exactly zero
        assert f[visible].abs().mean() > 1e-3
    # Not vacuous: a change inside a visible patch does change the visible features.
    i, j = active[0, 0].nonzero()[0].tolist()
    changed = x.clone()
    changed[0, :, R * i:R * i + 8, R * j:R * j + 8] += 1.0
    deepest = encoder(changed, active)[-1]
    assert not torch.equal(deepest[visible_at(active, deepest)], feats[-1][visible_at(active, feats[-1])])


@pytest.mark.parametrize("name, kwargs", [
    ("twistnet18", {}), ("twistnet18_no_spiral", {}), ("twistnet18_no_ais", {}),
    ("twistnet18_first_order", {}), ("twistnet18", dict(r=4, heads=2, stages=(2, 3, 4))),
    ("resnet18", {}), ("seresnet18", {}),
])
def test_every_layer_is_zero_at_masked_positions(name: str, kwargs: dict) -> None:
    """Each conv, norm, pool, STCI branch (twist conv included) and block output, not just the stages."""
    encoder = spark.SparkEncoder(build(name, **kwargs))
    active = mask(2, 2, 3)
    watched = spatial_outputs(encoder.model)
    assert any(layer.endswith("stci.twist") for layer in watched) == (name in ("twistnet18", "twistnet18_no_ais"))
    with copies_of_outputs(watched) as outputs:
        encoder(images(2, 64, 96), active)
    assert len(outputs) == len(watched) > 40
    for layer, out in outputs.items():
        visible = visible_at(active, out)
        assert not out[~visible].any(), f"{layer} leaks into masked positions"
        assert out[visible].any(), layer


@pytest.mark.parametrize("name", SE_AND_STCI)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_with_nothing_masked_the_encoder_computes_the_model_features(name: str, mode: str) -> None:
    """All patches visible: the mask-aware operators reduce to the model's own (index bookkeeping,
    normalisation and pooling formulas checked against PyTorch's and timm's)."""
    model = build(name, torch.float64)
    dense = copy.deepcopy(model)
    encoder = spark.SparkEncoder(model)
    x = images(3, 64, 64, torch.float64)
    active = torch.ones(3, 1, 2, 2, dtype=torch.bool)
    for m in (encoder, dense):
        m.train(mode == "train")
    with model_tools.capture({s: getattr(dense, s) for s in spark.STAGES}) as expected:
        dense.forward_features(x)
    for got, stage in zip(encoder(x, active), spark.STAGES):
        torch.testing.assert_close(got, expected[stage], rtol=1e-9, atol=1e-11)
    for key, value in dense.state_dict().items():   # running statistics updated alike
        torch.testing.assert_close(encoder.model.state_dict()[key], value, rtol=1e-9, atol=1e-12)


def test_the_wrapped_model_is_unchanged_outside_encoder_calls() -> None:
    model = build("seresnet18")
    reference = copy.deepcopy(model).eval()
    spark.SparkEncoder(model).eval()(images(2, 64, 64), mask(2, 2, 2))
    x = images(2, 64, 64, seed=5)
    assert torch.equal(model(x), reference(x))
    twist = build("twistnet18")
    twist_reference = copy.deepcopy(twist).eval()
    encoder = spark.SparkEncoder(twist).eval()
    assert torch.equal(twist(x), twist_reference(x))
    # A deep copy (an EMA, say) masks through its own state, not the original's.
    duplicate = copy.deepcopy(encoder)
    assert duplicate.model.layer3[0].stci.twist.spark_mask is duplicate.masks is not encoder.masks
    active = mask(2, 2, 2)
    for f in duplicate(x, active):
        assert not f[~visible_at(active, f)].any()


# --------------------------------------------------------------------------------------------
# Statistics over visible positions only
# --------------------------------------------------------------------------------------------
def test_batch_norm_statistics_over_visible_positions_only() -> None:
    encoder = spark.SparkEncoder(build("twistnet18", torch.float64))
    bn = encoder.model.layer2[0].bn1
    bn.momentum = 0.25
    old_mean, old_var = bn.running_mean.clone(), bn.running_var.clone()
    active = mask(4, 2, 2)
    with model_tools.capture({"bn": bn}, inputs=True) as seen, copies_of_outputs({"bn": bn}) as produced:
        encoder(images(4, 64, 64, torch.float64), active)
    x, out = seen["bn"], produced["bn"]
    visible = visible_at(active, x)
    rows = x.permute(0, 2, 3, 1)[visible.permute(0, 2, 3, 1)].view(-1, x.shape[1])   # [N visible, C]
    assert rows.shape[0] == 4 * 2 * 4 * 4 and x[~visible].abs().sum() == 0   # 2 visible 4 x 4 patches per image
    mean, var = rows.mean(0), rows.var(0, unbiased=False)
    expected = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
    expected = (expected * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)) * visible
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.running_mean, 0.75 * old_mean + 0.25 * mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.running_var, 0.75 * old_var + 0.25 * rows.var(0, unbiased=True),
                               rtol=1e-10, atol=1e-12)
    assert int(bn.num_batches_tracked) == 1
    # Statistics over every position (zeros included) would differ by far more than the tolerance.
    assert (x.mean(dim=(0, 2, 3)) - mean).abs().max() > 1e-2


def test_stci_group_norm_and_ais_pool_over_visible_positions_only() -> None:
    encoder = spark.SparkEncoder(build("twistnet18", torch.float64))
    stci = encoder.model.layer3[1].stci
    active = mask(3, 3, 3)
    watch = {"stci": stci, "norm": stci.norm, "ais": stci.ais}
    with model_tools.capture(watch, inputs=True) as seen, copies_of_outputs({"norm": stci.norm}) as produced:
        encoder(images(3, 96, 96, torch.float64), active)
    with encoder.masks.applied(active):
        feats = stci.interactions(seen["stci"])
    visible = visible_at(active, feats)
    expected_pool = torch.stack([f[v].view(f.shape[0], -1).mean(1) for f, v in zip(feats, visible)])
    torch.testing.assert_close(seen["ais"], expected_pool, rtol=1e-10, atol=1e-12)
    assert (seen["ais"] - feats.mean(dim=(2, 3))).abs().max() > 1e-3    # a plain mean differs

    x, out, groups = seen["norm"], produced["norm"], stci.norm.num_groups
    for b in range(3):
        for g, chans in enumerate(torch.arange(x.shape[1]).chunk(groups)):
            vals = x[b, chans][visible[b, chans]]
            mean, var = vals.mean(), vals.var(unbiased=False)
            want = (x[b, chans] - mean) / torch.sqrt(var + stci.norm.eps)
            want = want * stci.norm.weight[chans, None, None] + stci.norm.bias[chans, None, None]
            torch.testing.assert_close(out[b, chans], want * visible[b, chans], rtol=1e-9, atol=1e-11)


def test_se_pools_over_visible_positions_only() -> None:
    encoder = spark.SparkEncoder(build("seresnet18", torch.float64))
    se = encoder.model.layer2[1].se
    active = mask(2, 3, 3)
    with model_tools.capture({"se": se, "fc1": se.fc1}, inputs=True) as seen:
        encoder(images(2, 96, 96, torch.float64), active)
    x = seen["se"]
    visible = visible_at(active, x)
    expected = torch.stack([f[v].view(f.shape[0], -1).mean(1) for f, v in zip(x, visible)])
    torch.testing.assert_close(seen["fc1"][:, :, 0, 0], expected, rtol=1e-10, atol=1e-12)
    assert (x.mean(dim=(2, 3)) - expected).abs().max() > 1e-2      # a plain mean differs


# --------------------------------------------------------------------------------------------
# Decoder, loss, the whole model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height, width", [(64, 64), (96, 96), (64, 128)])
def test_decoder_output_shapes_and_reconstruction(height: int, width: int) -> None:
    net = spark.build_spark_model("resnet18", decoder_width=64, verbose=False)
    x = images(2, height, width)
    active = mask(2, height // R, width // R)
    assert net.predict(x, active).shape == (2, 3, height, width)
    assert [type(d.proj).__name__ for d in net.densify] == ["Conv2d"] * 4
    assert [d.proj.out_channels for d in net.densify] == [64, 32, 16, 8]
    shown = net.reconstruct(x, active)
    visible = spark.upsample_mask(active, height, width).expand_as(x)
    for t in (shown.masked, shown.reconstruction, shown.composite):
        assert t.shape == x.shape
    assert torch.equal(shown.composite[visible], x[visible])
    assert torch.equal(shown.composite[~visible], shown.reconstruction[~visible])
    assert not shown.masked[~visible].any() and torch.equal(shown.masked[visible], x[visible])
    assert torch.equal(shown.active, active)


def test_coarsest_densify_is_identity_when_widths_match() -> None:
    net = spark.build_spark_model("resnet18", decoder_width=512, verbose=False)
    assert isinstance(net.densify[0].proj, nn.Identity)
    assert [net.densify[i].proj.kernel_size for i in (1, 2, 3)] == [(3, 3)] * 3
    with pytest.raises(ValueError, match="multiple of 32"):
        spark.build_spark_model("resnet18", decoder_width=100, verbose=False)


def test_loss_counts_masked_patches_only() -> None:
    x, prediction = images(3, 64, 96, torch.float64), images(3, 64, 96, torch.float64, seed=7)
    active = mask(3, 2, 3)
    loss = spark.masked_patch_loss(prediction, x, active)
    # Direct: normalise each 32 x 32 x 3 patch, mean squared error, averaged over masked patches.
    errors = []
    for b in range(3):
        for i in range(2):
            for j in range(3):
                if not active[b, 0, i, j]:
                    p = x[b, :, 32 * i:32 * i + 32, 32 * j:32 * j + 32]
                    target = (p - p.mean()) / torch.sqrt(p.var() + 1e-6)
                    errors.append((prediction[b, :, 32 * i:32 * i + 32, 32 * j:32 * j + 32] - target).square().mean())
    torch.testing.assert_close(loss, torch.stack(errors).mean(), rtol=1e-12, atol=0)
    visible = spark.upsample_mask(active, 64, 96).expand_as(x)
    assert torch.equal(spark.masked_patch_loss(torch.where(visible, 50.0, prediction), x, active), loss)
    assert spark.masked_patch_loss(torch.where(visible, prediction, 0.0), x, active) != loss


def test_patchify_round_trip() -> None:
    x = images(2, 64, 96)
    patches = spark.patchify(x, 32)
    assert patches.shape == (2, 6, 32 * 32 * 3)
    assert torch.equal(patches[1, 4], x[1, :, 32:64, 32:64].permute(1, 2, 0).flatten())   # row 1, column 1
    assert torch.equal(spark.unpatchify(patches, 32, 2, 3), x)


@pytest.mark.parametrize("name", ["twistnet18", "twistnet18_no_ais", "resnet18", "seresnet18"])
def test_encoder_weights_load_into_the_registry_model(name: str, tmp_path: Path) -> None:
    net = spark.build_spark_model(name, decoder_width=64, verbose=False)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net(images(2, 64, 64), mask(2, 2, 2)).backward()
    optimizer.step()
    state = net.encoder_state_dict()
    fresh = models.build_model(name, 1000, verbose=False)
    assert list(state) == list(fresh.state_dict())
    fresh.load_state_dict(state, strict=True)
    x = images(2, 64, 64, seed=3)
    assert torch.equal(fresh.eval()(x), net.encoder.model.eval()(x))
    if name.startswith("twistnet"):   # the downstream path: a checkpoint file, another class count
        torch.save(state, tmp_path / "spark.pt")
        downstream = models.build_model(name, 47, pretrained=tmp_path / "spark.pt", verbose=False)
        assert torch.equal(downstream.layer3[0].stci.twist.weight, state["layer3.0.stci.twist.weight"])


def test_classifier_frozen_and_every_trained_parameter_gets_a_gradient() -> None:
    net = spark.build_spark_model("twistnet18", decoder_width=64, verbose=False)
    net(images(2, 64, 64), mask(2, 2, 2)).backward()
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen == ["encoder.model.fc.weight", "encoder.model.fc.bias"]
    missing = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []   # DistributedDataParallel needs no find_unused_parameters


def test_loss_falls_on_a_tiny_batch() -> None:
    torch.manual_seed(0)
    x = torch.stack([torch.from_numpy(np.array(render_synthtex(k, 64))).permute(2, 0, 1) for k in range(0, 32, 8)])
    x = (x.float() / 255 - 0.45) / 0.25
    active = mask(4, 2, 2)
    net = spark.build_spark_model("twistnet18", decoder_width=128, verbose=False)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=5e-3, weight_decay=0)
    losses = []
    for _ in range(8):
        loss = net(x, active)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert 0.9 < losses[0] < 1.1          # a near-zero prediction of unit-variance targets
    assert losses[-1] < 0.92 * losses[0], losses     # measured 1.002 -> 0.866


# --------------------------------------------------------------------------------------------
# What is not supported
# --------------------------------------------------------------------------------------------
def test_unsupported_models_are_clear_errors() -> None:
    with pytest.raises(models.ModelConfigError, match="twistnet18.*resnet18.*seresnet18"):
        spark.check_spark_model("convnext_tiny")
    with pytest.raises(models.ModelConfigError, match="Did you mean 'twistnet18'"):
        spark.build_spark_model("twistnet19")
    with pytest.raises(models.ModelConfigError, match="Supported models: twistnet18"):
        spark.SparkEncoder(nn.Sequential(nn.Conv2d(3, 8, 3)))
    odd = build("twistnet18")
    odd.layer2[1].bn2 = nn.LayerNorm([128, 8, 8])
    with pytest.raises(models.ModelConfigError, match=r"LayerNorm \(at 'layer2.1.bn2'\)"):
        spark.SparkEncoder(odd)
    model = build("resnet18")
    encoder = spark.SparkEncoder(model)
    with pytest.raises(ValueError, match="already inside a SparkEncoder"):
        spark.SparkEncoder(model)
    with pytest.raises(ValueError, match="multiples of 32"):
        encoder(images(1, 70, 64), torch.ones(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bool tensor of shape \(1, 1, 2, 2\)"):
        encoder(images(1, 64, 64), torch.ones(1, 1, 2, 2))


# --------------------------------------------------------------------------------------------
# Unlabelled image folders (datasets.py)
# --------------------------------------------------------------------------------------------
def test_unlabelled_images_are_found_recursively_and_unreadable_ones_skipped(tmp_path: Path) -> None:
    imagenet = fixtures.make_imagenet_folder(tmp_path / "imagenet", classes=2, train_per_class=3, val_per_class=1)
    dtd = fixtures.make_dtd(tmp_path / "dtd", classes=2, per_class=2, folds=1)
    fixtures.write_image(tmp_path / "loose" / "a" / "b" / "c" / "deep.png", 0, 0)
    fixtures.write_image(tmp_path / "loose" / ".hidden" / "skip.png", 0, 1)
    fixtures.write_image(tmp_path / "loose" / ".skip.png", 0, 2)
    (tmp_path / "loose" / "notes.txt").write_text("not an image")
    fixtures.corrupt(fixtures.write_image(tmp_path / "loose" / "broken.jpg", 0, 3))
    mix = tmp_path / "mix"
    mix.mkdir()
    os.symlink(imagenet / "train", mix / "imagenet_train")
    os.symlink(dtd / "images", mix / "dtd_images")
    os.symlink(tmp_path / "loose", mix / "loose")
    os.symlink(mix, tmp_path / "loose" / "loop")          # a link loop is listed once

    listed = datasets.list_images_recursive(mix)
    assert len(listed) == 6 + 4 + 2 and len({p.resolve() for p in listed}) == 12
    assert listed == datasets.list_images_recursive(mix)
    assert not any(".hidden" in str(p) or p.name.startswith(".") for p in listed)

    dataset = datasets.unlabelled_dataset([mix], transform=lambda im: torch.zeros(3, 8, 8))
    assert len(dataset) == 12 and set(dataset.targets) == {0}
    loader = DataLoader(dataset, batch_size=12, collate_fn=datasets.collate_skip_unreadable)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (batch, labels, skipped), = list(loader)
    assert batch.shape == (11, 3, 8, 8) and skipped == 1 and not labels.any()
    assert any("broken.jpg" in str(w.message) for w in caught)

    with pytest.raises(datasets.DataNotFoundError, match="No images under"):
        datasets.unlabelled_dataset(_empty(tmp_path), None)
    with pytest.raises(datasets.DataNotFoundError, match="not found"):
        datasets.unlabelled_dataset([tmp_path / "absent"], None)


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images")
    return tmp_path / "empty"
