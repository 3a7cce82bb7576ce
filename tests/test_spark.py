"""spark.py: masks, the mask-aware encoder (no leak, statistics over visible positions),
decoder, loss, weight export; datasets' unlabelled image folders; and pretrain_spark.py: two
processes under torchrun (gloo), exact resume from the middle of epoch 2, every output file, the
falling loss, refusals, and the weights downstream (train.py --pretrained, auto-detection).

Usage:
    .venv/bin/python -m pytest -q tests/test_spark.py
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

import datasets
from helpers import figures
import fixtures
import models
from helpers import loading, model_tools
import plot_results
import pretrain_imagenet
import pretrain_spark as spark_script
import transforms
from helpers import spark, utils
from helpers.synthtex import render_synthtex

# Fixtures that take seconds (they train, prune or start processes): their tests are `slow` (tests/conftest.py).
SLOW_FIXTURES = ('straight', 'interrupted')

ROOT = Path(__file__).resolve().parents[1]

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
    check_no_leak(name, mode)


def check_no_leak(name: str, mode: str = "train") -> None:
    """Visible features bit-identical whatever the masked pixels hold, and exactly zero at masked
    positions (a dense model fails the second: test_each_check_fails_on_a_broken_encoder)."""
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
    check_every_layer_zero(name, **kwargs)


def check_every_layer_zero(name: str, **kwargs) -> None:
    """Each conv, norm, pool, STCI branch (twist conv included) and block output, not just the stages."""
    encoder = spark.SparkEncoder(build(name, **kwargs))
    active = mask(2, 2, 3)
    watched = spatial_outputs(encoder.model)
    assert any(layer.endswith("stci.twist") for layer in watched) == (name in ("twistnet18", "twistnet18_no_ais"))
    with model_tools.capture(watched, clone=True) as outputs:
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
    check_batch_norm_statistics()


def check_batch_norm_statistics() -> None:
    encoder = spark.SparkEncoder(build("twistnet18", torch.float64))
    bn = encoder.model.layer2[0].bn1
    bn.momentum = 0.25
    old_mean, old_var = bn.running_mean.clone(), bn.running_var.clone()
    active = mask(4, 2, 2)
    with model_tools.capture({"bn": bn}, inputs=True) as seen, model_tools.capture({"bn": bn}, clone=True) as produced:
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
    check_stci_group_norm_and_ais_pool()


def check_stci_group_norm_and_ais_pool() -> None:
    encoder = spark.SparkEncoder(build("twistnet18", torch.float64))
    stci = encoder.model.layer3[1].stci
    active = mask(3, 3, 3)
    watch = {"stci": stci, "norm": stci.norm, "ais": stci.ais}
    with model_tools.capture(watch, inputs=True) as seen, model_tools.capture({"norm": stci.norm}, clone=True) as produced:
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
    check_se_pool()


def check_se_pool() -> None:
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
# An independent reference: SparK's own formulation (gather the visible positions, BatchNorm1d
# over them, scatter back), written here from the paper and its public code, not from spark.py
# --------------------------------------------------------------------------------------------
class ReferenceMask:
    """The coarse mask of the reference forward in progress (True = visible)."""
    active: torch.Tensor | None = None

    @classmethod
    def at(cls, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W] bool at x's resolution: nearest-neighbour upsampling of the coarse grid."""
        return F.interpolate(cls.active.to(x.dtype), size=x.shape[-2:], mode="nearest")[:, 0] > 0.5


class ReferenceConv(nn.Conv2d):
    """SparK's SparseConv2d: the dense conv, then the output multiplied by the mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out * ReferenceMask.at(out)[:, None]


class ReferenceMaxPool(nn.MaxPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out * ReferenceMask.at(out)[:, None]


class ReferenceBatchNorm(nn.BatchNorm2d):
    """SparK's SparseBatchNorm2d: visible positions gathered into [N, C] rows, BatchNorm1d on the
    rows (batch statistics and the running update from them), scattered back into zeros."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        visible = ReferenceMask.at(x)
        rows = x.permute(0, 2, 3, 1)[visible]                                   # [N, C]
        if self.training:
            self.num_batches_tracked += 1
        rows = F.batch_norm(rows, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)
        out = torch.zeros_like(x.permute(0, 2, 3, 1))
        out[visible] = rows
        return out.permute(0, 3, 1, 2)


class ReferenceGroupNorm(nn.GroupNorm):
    """GroupNorm of each image over its gathered visible positions, scattered back into zeros."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        visible = ReferenceMask.at(x)
        out = torch.zeros_like(x.permute(0, 2, 3, 1))
        for b in range(x.shape[0]):
            rows = x[b].permute(1, 2, 0)[visible[b]]                            # [N_b, C]
            grouped = rows.reshape(len(rows), self.num_groups, -1)
            mean = grouped.mean(dim=(0, 2), keepdim=True)
            var = grouped.var(dim=(0, 2), unbiased=False, keepdim=True)
            normed = ((grouped - mean) / torch.sqrt(var + self.eps)).reshape_as(rows)
            out[b][visible[b]] = normed * self.weight + self.bias
        return out.permute(0, 3, 1, 2)


class ReferenceSTCI(models.MultiHeadSTCI):
    """AIS pooling over each image's gathered visible positions."""

    def ais_weights(self, feats: torch.Tensor) -> torch.Tensor | None:
        if self.ais is None:
            return None
        visible = ReferenceMask.at(feats)
        pooled = torch.stack([f.permute(1, 2, 0)[v].mean(dim=0) for f, v in zip(feats, visible)])
        return self.ais(pooled)


REFERENCE_CLASSES = {nn.Conv2d: ReferenceConv, nn.MaxPool2d: ReferenceMaxPool, nn.BatchNorm2d: ReferenceBatchNorm,
                     nn.GroupNorm: ReferenceGroupNorm, models.MultiHeadSTCI: ReferenceSTCI}


def reference_sparse_model(model: nn.Module) -> nn.Module:
    """A copy of a dense registry model with every conv, pool and norm of the feature path swapped
    for its reference class (AIS's Linear layers and the classifier see pooled vectors: unchanged)."""
    reference = copy.deepcopy(model)
    for name, module in reference.named_modules():
        if name.split(".")[0] in spark.FEATURE_PATH and ".ais." not in f".{name}." and type(module) in REFERENCE_CLASSES:
            module.__class__ = REFERENCE_CLASSES[type(module)]
    return reference


def reference_stages(reference: nn.Module, x: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
    pixels = F.interpolate(active.to(x.dtype), size=x.shape[-2:], mode="nearest")
    ReferenceMask.active = active
    try:
        with model_tools.capture({s: getattr(reference, s) for s in spark.STAGES}, clone=True) as out:
            reference.forward_features(x * pixels)
    finally:
        ReferenceMask.active = None
    return [out[s] for s in spark.STAGES]


@pytest.mark.parametrize("name", ["resnet18", "twistnet18"])
def test_the_encoder_matches_sparks_gather_batchnorm1d_scatter_formulation(name: str) -> None:
    check_against_reference(name)


def check_against_reference(name: str) -> None:
    """Several random masks in a row (train mode: the running statistics accumulate on both sides),
    then eval mode: the same stage maps and the same running statistics as the reference."""
    model = build(name, torch.float64)
    reference = reference_sparse_model(model)
    encoder = spark.SparkEncoder(model)
    for seed in range(4):
        ratio = (0.3, 0.6, 0.75, 0.5)[seed]
        active, x = mask(3, 3, 2, seed=seed, ratio=ratio), images(3, 96, 64, torch.float64, seed=20 + seed)
        for got, want in zip(encoder(x, active), reference_stages(reference, x, active)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    state, expected = encoder.model.state_dict(), reference.state_dict()
    for key in expected:
        torch.testing.assert_close(state[key], expected[key], rtol=1e-9, atol=1e-12, msg=key)
    encoder.eval(), reference.eval()
    active, x = mask(2, 2, 2, seed=9), images(2, 64, 64, torch.float64, seed=30)
    for got, want in zip(encoder(x, active), reference_stages(reference, x, active)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


# A broken mask-aware encoder, one defect at a time; "dense": the mask is never consulted (masked
# pixels are still zeroed first), so every layer is the plain dense one, as in a dense TwistNet.
BROKEN = {
    "dense": lambda mp: mp.setattr(spark.MaskState, "at", lambda self, x: None),
    "conv_not_remasked": lambda mp: mp.setattr(spark.MaskedConv2d, "forward", nn.Conv2d.forward),
    "batchnorm_over_all_positions": lambda mp: mp.setattr(
        spark, "batch_norm_visible", lambda x, active, norm: nn.BatchNorm2d.forward(norm, x) * active),
    "groupnorm_over_all_positions": lambda mp: mp.setattr(
        spark, "group_norm_visible", lambda x, active, norm: nn.GroupNorm.forward(norm, x) * active),
    "pool_over_all_positions": lambda mp: mp.setattr(
        spark, "visible_mean", lambda x, active, keepdim=False: x.mean(dim=(2, 3), keepdim=keepdim)),
}
# A conv that is not re-masked is caught by the per-layer check only: the BatchNorm after every conv
# re-masks, so stage maps, statistics and the reference stay right (and so does SparK's output).
CAUGHT_BY = [
    (lambda: check_no_leak("resnet18"), ("dense",)),
    (lambda: check_every_layer_zero("resnet18"), ("dense", "conv_not_remasked")),
    (check_batch_norm_statistics, ("dense", "batchnorm_over_all_positions")),
    (check_stci_group_norm_and_ais_pool, ("dense", "groupnorm_over_all_positions", "pool_over_all_positions")),
    (check_se_pool, ("dense", "pool_over_all_positions")),
    (lambda: check_against_reference("twistnet18"),
     ("dense", "batchnorm_over_all_positions", "groupnorm_over_all_positions", "pool_over_all_positions")),
]


@pytest.mark.parametrize("check, broken", [(c, b) for c, names in CAUGHT_BY for b in names],
                         ids=[f"{i}-{b}" for i, (_, names) in enumerate(CAUGHT_BY) for b in names])
def test_each_check_fails_on_a_broken_encoder(check, broken: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The no-leak, zero, statistics and reference checks above are not vacuous: each fails on a
    dense model and on the mask-aware layer it is about, broken."""
    BROKEN[broken](monkeypatch)
    with pytest.raises(AssertionError):
        check()


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
    assert list(state) == [k for k in fresh.state_dict() if not k.startswith("fc.")]   # no untrained classifier
    fresh.load_state_dict(state, strict=False)
    fresh.fc.load_state_dict(net.encoder.model.fc.state_dict())
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
    loader = DataLoader(dataset, batch_size=12, collate_fn=loading.collate_skip_unreadable)
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


# --------------------------------------------------------------------------------------------
# The training script (pretrain_spark.py)
# --------------------------------------------------------------------------------------------
SCRIPT = str(ROOT / "pretrain_spark.py")
# One thread per process keeps the CPU kernels bitwise repeatable (resumed runs compare with ==)
# and stops two processes from fighting over two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--device", "cpu", "--workers", "0", "--img_size", "64", "--batch_size", "4", "--decoder_width", "128",
        "--epochs", "2", "--warmup_epochs", "1", "--vis_every", "1", "--vis_images", "3", "--no_progress"]
IMAGES = 24      # 3 optimizer steps of 8 images per epoch (2 processes x 4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           SCRIPT, *TINY, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def records(ckpt_dir: Path, kind: str) -> list[dict]:
    return [r for r in utils.read_jsonl(ckpt_dir / "log.jsonl") if r["type"] == kind]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 JPEGs in class folders (which pretraining ignores), 72 px."""
    root = fixtures.make_imagenet_folder(tmp_path_factory.mktemp("unlabelled"), classes=3, train_per_class=8,
                                         val_per_class=0, size=72)
    return root / "train"


@pytest.fixture(scope="module")
def straight(unlabelled: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """(checkpoint dir, command) of an uninterrupted two-process, two-epoch run."""
    base = tmp_path_factory.mktemp("straight")
    command = ["--data_dir", str(unlabelled), "--checkpoint_dir", str(base / "ckpt"),
               "--weights_dir", str(base / "weights")]
    torchrun(*command)
    return base / "ckpt", command


@pytest.fixture(scope="module")
def interrupted(unlabelled: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The same run stopped one step into epoch 2, and its output."""
    ckpt = tmp_path_factory.mktemp("interrupted") / "ckpt"
    proc = torchrun("--data_dir", str(unlabelled), "--checkpoint_dir", str(ckpt), "--weights_dir",
                    str(ckpt.parent / "weights"), "--stop_after_steps", "4", check=False)
    assert proc.returncode != 0, "a stopped run must not report success"
    return ckpt, proc.stdout + proc.stderr


def test_two_process_run_writes_every_output(straight: tuple[Path, list[str]]) -> None:
    ckpt, _ = straight
    for name in ("latest.pt", "twistnet18_spark.pt", "log.jsonl", "train.log", "stdout.txt", "stderr.txt",
                 "reconstructions/epoch_0001.png", "reconstructions/epoch_0002.png"):
        assert (ckpt / name).is_file(), name
    weights = load(ckpt / "twistnet18_spark.pt")
    copy_ = load(ckpt.parent / "weights" / "twistnet18_spark.pt")
    assert list(weights) == list(copy_) and all(torch.equal(weights[k], copy_[k]) for k in weights)
    fresh = models.build_model("twistnet18", 47, verbose=False).state_dict()
    assert set(fresh) - set(weights) == {"fc.weight", "fc.bias"} and set(weights) <= set(fresh)
    latest = load(ckpt / "latest.pt")
    assert latest["kind"] == "spark" and latest["epoch"] == 2 and len(latest["rank_states"]) == 2
    # The weights are the trained encoder's; the BatchNorm statistics are re-estimated on whole images.
    statistics = {k for k in weights if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert all(torch.equal(weights[k], latest["model"][f"encoder.model.{k}"]) for k in set(weights) - statistics)
    assert not any(torch.equal(weights[k], latest["model"][f"encoder.model.{k}"]) for k in statistics
                   if k.endswith("running_var"))

    header, = records(ckpt, "header")
    assert header["world_size"] == 2 and header["backend"] == "gloo" and header["global_batch"] == 8
    assert header["base_lr"] == 2e-4 and header["lr"] == pytest.approx(2e-4 * 8 / 256)
    assert header["train_images"] == IMAGES and header["optimizer"] == "lamb" and header["mask_ratio"] == 0.6
    assert "pretrain_spark.py" in header["command"] and header["git_commit"] and header["config"]["epochs"] == 2
    epochs = records(ckpt, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert r["train_images"] == IMAGES and r["skipped_images"] == 0 and r["img_size"] == 64
        assert 0.5 < r["train_loss"] < 1.5 and r["images_per_s"] > 0 and r["eta_s"] >= 0
        assert 0 <= r["data_wait_share"] <= 1 and r["epoch_time_s"] > 0 and len(r["gates"]) == 4
        assert r["figure"] == str(ckpt / "reconstructions" / f"epoch_{r['epoch']:04d}.png")
    assert epochs[0]["weight_decay"] == pytest.approx(0.04)           # the epoch's first step, as its lr
    assert epochs[1]["weight_decay"] == pytest.approx(spark_script.weight_decay_at(3, 6, 0.04, 0.2))
    assert epochs[1]["lr"] == pytest.approx(2e-4 * 8 / 256)         # warm-up over epoch 1 only
    final, = records(ckpt, "final")
    assert final["weights"] == str(ckpt / "twistnet18_spark.pt") and final["train_loss"] == epochs[-1]["train_loss"]

    log = (ckpt / "train.log").read_text()
    assert log.startswith("command: ") and "pretrain_spark.py" in log and "| git " in log
    assert "epoch 2/2 | 64px" in log and "ETA" in log and "reconstruction loss" in log
    assert "epoch 2/2 | 64px" in (ckpt / "stdout.txt").read_text()
    with Image.open(ckpt / "reconstructions" / "epoch_0002.png") as png:   # 3 rows of 4 columns
        assert png.size == (4 * 64 + 5 * 2, spark.TITLE_HEIGHT + 3 * 64 + 4 * 2)


def test_plots_read_the_log(straight: tuple[Path, list[str]], tmp_path: Path) -> None:
    """plot_results' curves (the loss alone: no accuracy panel) and gates read a SparK log."""
    log = straight[0] / "log.jsonl"
    epochs = plot_results.read_log(log)
    with figures.paper_style():
        curves = plot_results.curves_figure(epochs)
        gates = plot_results.gate_figure(epochs)
    loss_axis, = curves.axes
    train, = loss_axis.get_lines()
    assert list(train.get_ydata()) == [r["train_loss"] for r in epochs]
    assert len(gates.axes[0].get_lines()) == 4
    written = plot_results.make_plots(["--plot", "curves", "--log_file", str(log), "--save_dir", str(tmp_path)])
    assert sorted(p.suffix for p in written) == [".pdf", ".png"]


def test_resume_from_the_middle_of_epoch_2_matches_the_uninterrupted_run(
        straight: tuple[Path, list[str]], interrupted: tuple[Path, str], tmp_path: Path) -> None:
    stopped, output = interrupted
    assert "Interrupted at epoch 2, step 1/3" in output and "Run the same command again" in output
    saved = load(stopped / "latest.pt")
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 1, 4)
    assert [r["epoch"] for r in records(stopped, "epoch")] == [1]

    # The uninterrupted run's command, in a copy of the stopped run's directory: --resume auto.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(stopped, ckpt)
    command = [a if a != str(straight[0]) else str(ckpt) for a in straight[1]]
    proc = torchrun(*command)
    assert "Resumed from" in proc.stdout and "epoch 2, step 1/3" in proc.stdout
    a, b = records(straight[0], "epoch"), records(ckpt, "epoch")
    assert [r["epoch"] for r in b] == [1, 2] and len(records(ckpt, "resume")) == 1
    for ra, rb in zip(a, b):
        for key in ("lr", "train_loss", "train_images", "weight_decay", "gates"):
            assert ra[key] == rb[key], (ra["epoch"], key, ra[key], rb[key])
    wa, wb = load(straight[0] / "twistnet18_spark.pt"), load(ckpt / "twistnet18_spark.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = load(straight[0] / "latest.pt"), load(ckpt / "latest.pt")
    assert all(torch.equal(la["model"][k], lb["model"][k]) for k in la["model"])    # decoder too


def test_rerun_of_a_finished_run_and_refusals(straight: tuple[Path, list[str]], interrupted: tuple[Path, str],
                                              tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    finished = tmp_path / "finished"
    shutil.copytree(straight[0], finished)
    command = [a if a != str(straight[0]) else str(finished) for a in straight[1]]
    before = (finished / "log.jsonl").read_text()
    assert utils.run_main(spark_script.main, [*TINY, *command]) == 0
    assert "is a finished run (2 of 2 epochs): nothing to train" in capsys.readouterr().out
    assert (finished / "log.jsonl").read_text() == before

    stopped = tmp_path / "stopped"
    shutil.copytree(interrupted[0], stopped)
    args = [*TINY, "--data_dir", str(tmp_path), "--checkpoint_dir", str(stopped)]
    assert utils.run_main(spark_script.main, [*args, "--mask_ratio", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--mask_ratio: 0.6 -> 0.5" in err
    with pytest.raises(utils.UserError, match="not a pretrain_imagenet.py checkpoint .a spark one"):
        pretrain_imagenet.main(["--resume", str(stopped / "latest.pt"), "--device", "cpu"])


def start_and_kill_when_saved(command: list[str], latest: Path, seconds: float = 240) -> None:
    """Start pretrain_spark.py and SIGKILL it once `latest` exists (as a crash or an OOM kill would)."""
    proc = subprocess.Popen([sys.executable, SCRIPT, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=ENV, text=True)
    deadline = time.time() + seconds
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    _, err = proc.communicate(timeout=60)
    assert latest.exists(), err


@pytest.mark.slow
def test_resume_refuses_other_images_and_follows_a_moved_folder(unlabelled: Path, tmp_path: Path,
                                                                one_torch_thread: None,
                                                                capsys: pytest.CaptureFixture) -> None:
    """Killed with SIGKILL mid-run; resumed on another folder (refused, with what differs), on the
    same images re-exported in place (refused), on the moved folder (resumes), and from a checkpoint
    that predates the record of its images (resumes, with a note)."""
    data = tmp_path / "A"
    shutil.copytree(unlabelled, data)
    ckpt, weights = tmp_path / "ckpt", tmp_path / "weights"
    command = [*TINY, "--epochs", "50", "--vis_every", "0", "--save_every_steps", "2", "--checkpoint_dir", str(ckpt),
               "--weights_dir", str(weights)]
    start_and_kill_when_saved([*command, "--data_dir", str(data)], ckpt / "latest.pt")
    saved = load(ckpt / "latest.pt")
    assert saved["images"]["fingerprint"]["sizes"] == {"train": IMAGES, "val": 0, "test": 0}

    fewer = tmp_path / "B"
    shutil.copytree(data, fewer)
    sorted(fewer.rglob("*.JPEG"))[3].unlink()
    reexported = tmp_path / "C"
    shutil.copytree(data, reexported)
    victim = sorted(reexported.rglob("*.JPEG"))[3]
    Image.open(victim).convert("RGB").save(victim, format="JPEG", quality=30)   # same name, other bytes
    for other, expected in ((fewer, f"the split sizes differ (train {IMAGES} -> {IMAGES - 1})"),
                            (reexported, "the image files changed (same names and labels, other file sizes")):
        assert utils.run_main(spark_script.main, [*command, "--data_dir", str(other)]) == 2
        line = fixtures.one_error_line(capsys.readouterr().err)
        assert f"{ckpt / 'latest.pt'} was pretrained on other images than --data_dir {other}" in line
        assert expected in line and "start a fresh --checkpoint_dir" in line, line
    assert not weights.exists()                 # nothing was exported from the wrong images

    moved = tmp_path / "A_moved"
    data.rename(moved)
    assert utils.run_main(spark_script.main, [*command, "--data_dir", str(moved), "--stop_after_steps", "1"]) == 130
    assert "Resumed from" in capsys.readouterr().out

    old = load(ckpt / "latest.pt")               # as written before the images were recorded
    del old["images"]
    utils.atomic_save(old, ckpt / "latest.pt")
    assert utils.run_main(spark_script.main, [*command, "--data_dir", str(reexported), "--stop_after_steps", "1"]) == 130
    out = capsys.readouterr().out
    assert "Resumed from" in out and "was written before pretraining recorded its images" in out
    recorded = load(ckpt / "latest.pt")["images"]["fingerprint"]           # recorded again, of these images
    assert recorded["file_sizes_sha256"] != saved["images"]["fingerprint"]["file_sizes_sha256"]


def test_resume_fingerprint_lets_each_data_dir_folder_move_on_its_own(unlabelled: Path, tmp_path: Path) -> None:
    """Several --data_dir folders (ImageNet's train/ and DTD's images/, say) on different disks: one
    of them moved is still the same image set; an image taken from one is not."""
    from helpers import distributed

    first, second = tmp_path / "disk1" / "imagenet", tmp_path / "disk2" / "dtd"
    shutil.copytree(unlabelled, first)
    shutil.copytree(unlabelled, second)

    def image_set(*folders: Path) -> dict:
        found = datasets.unlabelled_dataset([str(f) for f in folders], None)
        return distributed.image_set([], {"train": found.samples}, [str(f) for f in folders])

    before = image_set(first, second)
    moved = tmp_path / "disk3" / "dtd"
    moved.parent.mkdir()
    second.rename(moved)
    after = image_set(first, moved)
    assert after == before
    sorted(moved.rglob("*.JPEG"))[0].unlink()
    assert distributed.image_set_change({"images": before}, image_set(first, moved)).startswith(
        f"the split sizes differ (train {2 * IMAGES} -> {2 * IMAGES - 1})")


@pytest.mark.slow
def test_loss_falls_and_unreadable_images_are_skipped(unlabelled: Path, tmp_path: Path, one_torch_thread: None,
                                                     capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    shutil.copytree(unlabelled, data)
    fixtures.corrupt(sorted(data.rglob("*.JPEG"))[5])
    ckpt = tmp_path / "ckpt"
    with pytest.warns(loading.UnreadableImageWarning, match="_5.JPEG"):
        assert spark_script.main([*TINY, "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--weights_dir",
                                  str(tmp_path / "w"), "--batch_size", "8", "--epochs", "6", "--warmup_epochs", "0",
                                  "--base_lr", "0.32", "--vis_every", "0"]) == 0
    epochs = records(ckpt, "epoch")
    assert all(r["skipped_images"] == 1 and r["train_images"] == IMAGES - 1 for r in epochs)
    losses = [r["train_loss"] for r in epochs]
    assert 0.95 < losses[0] < 1.05           # a near-zero prediction of unit-variance targets
    assert losses[-1] < 0.97 * losses[0], losses     # measured 0.997 -> 0.945 (LAMB, lr 0.01)
    assert not (ckpt / "reconstructions").exists()


def test_init_resnet18_starts_from_the_resnet18_weights(unlabelled: Path, tmp_path: Path, one_torch_thread: None,
                                                       capsys: pytest.CaptureFixture) -> None:
    """SparK on few images can start from a ResNet-18 backbone (as SparK's --init_weight suggests)."""
    import timm
    torch.manual_seed(5)
    source = timm.create_model("resnet18").state_dict()
    torch.save(source, tmp_path / "resnet18.pth")
    ckpt = tmp_path / "ckpt"
    assert spark_script.main([*TINY, "--data_dir", str(unlabelled), "--checkpoint_dir", str(ckpt), "--init", "resnet18",
                              "--resnet18_weights", str(tmp_path / "resnet18.pth"), "--stop_after_steps", "1"]) == 130
    assert "ResNet-18 -> twistnet18 (policy 'all')" in capsys.readouterr().out
    # One LAMB step at lr 1e-6 (a third of the first warm-up epoch) moves each weight by ~1e-6 of its norm.
    after_one_step = load(ckpt / "latest.pt")["model"]
    for name in ("conv1.weight", "layer4.1.conv2.weight"):
        change = after_one_step[f"encoder.model.{name}"] - source[name]
        assert change.norm() < 1e-4 * source[name].norm(), name


def test_reconstruction_grid_shows_input_masked_reconstruction_and_composite() -> None:
    net = spark.build_spark_model("resnet18", decoder_width=64, verbose=False).eval()
    x, active = images(2, 64, 96), mask(2, 2, 3)
    shown = net.reconstruct(x, active)
    grid = np.asarray(spark.reconstruction_grid(shown, pad=2))
    assert grid.shape == (spark.TITLE_HEIGHT + 2 * 64 + 3 * 2, 4 * 96 + 5 * 2, 3)
    cells = [[grid[spark.TITLE_HEIGHT + 2 + r * 66:][:64, 2 + c * 98:][:, :96] for c in range(4)] for r in range(2)]
    visible = spark.upsample_mask(active, 64, 96)[:, 0].numpy()
    for r in range(2):
        source, masked, reconstruction, composite = cells[r]
        v = visible[r]
        assert (masked[v] == source[v]).all() and (composite[v] == source[v]).all()
        assert (composite[~v] == reconstruction[~v]).all()
        # A masked pixel is zero after normalisation: the mean colour once denormalised.
        mean_colour = np.round(255 * np.array(transforms.IMAGENET_MEAN)).astype(np.uint8)
        assert (np.abs(masked[~v].astype(int) - mean_colour) <= 1).all()
    assert not (cells[0][0] == cells[0][2]).all()


def test_the_script_shares_the_imagenet_script_flags_and_exports_spark_encoder() -> None:
    assert spark_script.SparkEncoder is spark.SparkEncoder
    ours, theirs = spark_script.build_parser(), pretrain_imagenet.build_parser()
    for flag in ("--data_dir", "--data", "--model", "--epochs", "--batch_size", "--img_size", "--checkpoint_dir",
                 "--resume", "--weights_dir", "--device", "--workers", "--amp", "--base_lr", "--accum_steps",
                 "--progressive", "--profile", "--stop_after_steps", "--channels_last", "--decode_size"):
        assert any(flag in a.option_strings for a in ours._actions), flag
        assert any(flag in a.option_strings for a in theirs._actions), flag
    assert ours.parse_args([]).resume == "auto"


def test_schedules_masks_and_parameter_groups() -> None:
    wd = [spark_script.weight_decay_at(s, 11, 0.04, 0.2) for s in range(11)]
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.2) and wd == sorted(wd)
    a = spark_script.step_masks(0, 3, 5, 8, (2, 2), 0.6)
    assert torch.equal(a, spark_script.step_masks(0, 3, 5, 8, (2, 2), 0.6))
    assert not torch.equal(a, spark_script.step_masks(0, 3, 6, 8, (2, 2), 0.6))
    net = spark.build_spark_model("twistnet18", decoder_width=64, verbose=False)
    decay, no_decay = net.param_groups()
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (1.0, 0.0)
    ids = {id(p) for p in no_decay["params"]}
    assert all(id(d.mask_token) in ids for d in net.densify)
    assert all(p.ndim > 1 for p in decay["params"]) and all(id(b.gate) in ids for b in net.encoder.model.twist_blocks().values())
    trained = {id(p) for p in net.parameters() if p.requires_grad}
    assert {id(p) for p in decay["params"]} | ids == trained and not ({id(p) for p in decay["params"]} & ids)


# --------------------------------------------------------------------------------------------
# Downstream: the SparK weights in train.py and build_model
# --------------------------------------------------------------------------------------------
def test_train_py_pretrained_loads_every_backbone_and_stci_tensor(straight: tuple[Path, list[str]],
                                                                 tmp_path: Path) -> None:
    weights = straight[0] / "twistnet18_spark.pt"
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", "synthtex", "--model", "twistnet18",
           "--pretrained", str(weights), "--epochs", "1", "--img_size", "32", "--workers", "0", "--no_progress",
           "--batch_size", "32", "--run_dir", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = len(load(weights))
    assert n == 204     # TwistNet-18's state_dict (206 tensors) less the classifier
    assert (f"[TwistNet Pretrained] Loaded {n} tensors from {weights} (every backbone and STCI tensor; "
            f"classifier left at init: not in the file)") in proc.stdout


def test_a_bare_pretrained_never_picks_spark_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """weights/twistnet18_spark.pt in the current directory and beside models.py: a bare
    --pretrained takes the ImageNet file, else the ResNet-18 transfer; the SparK file only by path."""
    import timm
    cwd, script = tmp_path.resolve() / "cwd", tmp_path.resolve() / "script"
    for folder in (cwd / "weights", script / "weights"):
        folder.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(models, "__file__", str(script / "models.py"))
    state = build("twistnet18").state_dict()
    marked = {kind: {k: torch.full_like(v, value) if k == "conv1.weight" else v for k, v in state.items()
                     if not k.startswith("fc.")} for kind, value in (("imagenet", 1.0), ("spark", 2.0))}
    spark_files = [cwd / "weights" / "twistnet18_spark.pt", script / "weights" / "twistnet18_spark.pt"]
    for path in spark_files:
        torch.save(marked["spark"], path)
    torch.manual_seed(3)
    resnet = timm.create_model("resnet18").state_dict()
    torch.save(resnet, tmp_path / "resnet18.pth")

    with pytest.warns(UserWarning, match="No TwistNet ImageNet weights found"):
        model = models.build_model("twistnet18", 47, pretrained=True, resnet18_weights=tmp_path / "resnet18.pth")
    out = capsys.readouterr().out
    assert torch.equal(model.conv1.weight, resnet["conv1.weight"]) and "ResNet-18 -> twistnet18" in out
    assert "twistnet18_spark.pt" not in out.split("[WARNING]")[0]      # never "found"
    with pytest.warns(UserWarning, match="No TwistNet ImageNet weights found for 'twistnet18_no_ais'"):
        variant = models.build_model("twistnet18_no_ais", 47, pretrained=True,
                                     resnet18_weights=tmp_path / "resnet18.pth")
    assert torch.equal(variant.conv1.weight, resnet["conv1.weight"])   # no borrowing of SparK weights either

    torch.save(marked["imagenet"], script / "weights" / "twistnet18_imagenet.pt")
    model = models.build_model("twistnet18", 47, pretrained=True)
    out = capsys.readouterr().out
    assert (model.conv1.weight == 1).all()
    assert f"Found TwistNet weights: {script / 'weights' / 'twistnet18_imagenet.pt'}\n" in out
    named = models.build_model("twistnet18", 47, pretrained=spark_files[0])   # used when named
    assert (named.conv1.weight == 2).all()
    assert models.twistnet_weight_candidates() == [cwd / "weights" / "twistnet18_imagenet.pt",
                                                   script / "weights" / "twistnet18_imagenet.pt"]


# --------------------------------------------------------------------------------------------
# Whole-image checks: effective rank, collapse warning, linear probe, BatchNorm re-estimation
# --------------------------------------------------------------------------------------------
def test_effective_rank_of_known_spectra() -> None:
    eye = torch.eye(8, dtype=torch.float64)
    for k in (1, 3, 8):      # rows +-e_1 ... +-e_k: centred, k equal singular values
        features = torch.cat([eye[:k], -eye[:k]])
        assert spark.effective_rank(features) == pytest.approx(k, rel=1e-9)
    rank_one = torch.randn(50, 1, dtype=torch.float64) @ torch.randn(1, 16, dtype=torch.float64)
    assert spark.effective_rank(rank_one) == pytest.approx(1.0, abs=1e-6)
    assert spark.effective_rank(torch.ones(10, 4)) == 0.0
    # Two directions with singular values 3 : 1 -> exp(H(0.75, 0.25)).
    skewed = torch.cat([3 * eye[:1], -3 * eye[:1], eye[1:2], -eye[1:2]])
    assert spark.effective_rank(skewed) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    gaussian = torch.randn(400, 64, generator=torch.Generator().manual_seed(0))
    assert 50 < spark.effective_rank(gaussian) < 64


def test_collapse_check_warns_when_layer4_rank_halves(unlabelled: Path, one_torch_thread: None) -> None:
    args = spark_script.build_parser().parse_args(["--img_size", "64", "--rank_images", "24"])
    initial = build("resnet18")
    lines: list[str] = []
    checks = spark_script.WholeImageChecks(args, datasets.unlabelled_dataset(unlabelled, None), initial, lines.append)
    assert checks.images.shape == (24, 3, 64, 64)
    healthy = checks.ranks(initial)
    assert healthy["feat_rank_layer4"] == healthy["feat_rank_layer4_init"] > 5 and not lines
    assert set(healthy) == {"feat_rank_layer3", "feat_rank_layer4", "feat_rank_layer3_init", "feat_rank_layer4_init"}
    collapsed = copy.deepcopy(initial)
    with torch.no_grad():   # layer4's output carried by two channels whatever the image
        for m in collapsed.layer4.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight[2:] = 0.0
    ranks = checks.ranks(collapsed)
    assert ranks["feat_rank_layer4"] < 2.01 and ranks["feat_rank_layer3"] == pytest.approx(healthy["feat_rank_layer3"])
    warning, = lines
    assert warning.startswith("warning: layer4 feature rank ") and "collapsing" in warning
    assert torch.equal(initial.layer4[0].bn1.weight, build("resnet18").layer4[0].bn1.weight)   # untouched


def statistics_misfits(model: nn.Module, x: torch.Tensor, stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
                       ) -> list[str]:
    """BatchNorms whose running statistics (or `stats`: name -> (mean, var)) are not those of
    their inputs in an eval pass over x: mean off by more than 0.1 std, or variance by 12%.
    With one batch, re-estimated statistics are off by the unbiased variance's n / (n - 1)
    compounding through the layers: measured at most 0.05 std and 6.5% (layer4, n = 64)."""
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    with model_tools.capture(norms, inputs=True) as seen, model_tools.evaluating(model), torch.no_grad():
        model.forward_features(x)
    misfits = []
    for name, m in norms.items():
        values = seen[name].double()
        mean, var = values.mean(dim=(0, 2, 3)), values.var(dim=(0, 2, 3))
        have_mean, have_var = (m.running_mean, m.running_var) if stats is None else stats[name]
        if ((have_mean.double() - mean).abs() > 0.1 * var.sqrt()).any() or ((have_var.double() / var - 1).abs() > 0.12).any():
            misfits.append(name)
    return misfits


def test_batch_norm_reestimation_gives_whole_image_statistics() -> None:
    model = build("twistnet18")
    x = images(16, 64, 64, seed=4)
    assert len(statistics_misfits(model, x)) > 20          # build()'s random running statistics (28 BatchNorms)
    spark.reestimate_batch_norm(model, x, batch_size=16)
    assert model.training                                   # mode restored
    assert statistics_misfits(model, x) == []
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.momentum == 0.1 and int(m.num_batches_tracked) == 1 for m in norms)


@pytest.mark.slow
def test_spark_run_logs_ranks_and_probe_and_exports_whole_image_statistics(
        probe_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread: None,
        capsys: pytest.CaptureFixture) -> None:
    """A one-process run without --weights_dir: no copy anywhere but the checkpoint directory (the
    run happens in an empty current directory whose weights/ must stay absent)."""
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "ckpt"
    assert spark_script.build_parser().parse_args([]).weights_dir is None
    assert spark_script.main([*TINY, "--data_dir", str(probe_folder / "train"), "--checkpoint_dir", str(ckpt),
                              "--vis_every", "0", "--rank_images", "24", "--bn_images", "24",
                              "--probe_dir", str(probe_folder)]) == 0
    out = capsys.readouterr().out
    assert "Copied to" not in out and not (tmp_path / "weights").exists()
    epochs = records(ckpt, "epoch")
    for r in epochs:
        assert 5 < r["feat_rank_layer4"] <= 23 and 5 < r["feat_rank_layer4_init"] <= 23
        assert 5 < r["feat_rank_layer3"] <= 23 and r["feat_rank_layer3_init"] > 5
    assert len({r["feat_rank_layer4_init"] for r in epochs}) == 1
    assert "feature rank layer3 " in out and "(init " in out
    final, = records(ckpt, "final")
    assert 0 <= final["probe_acc"] <= 100 and 0 <= final["probe_acc_init"] <= 100 and final["bn_images"] == 24
    assert "feat_rank_layer4" in final and "linear probe on " in out
    # The final ranks are those of the last epoch: the weights have not changed since.
    assert {k: v for k, v in final.items() if k.startswith("feat_rank_")} == \
        {k: v for k, v in epochs[-1].items() if k.startswith("feat_rank_")}

    # The exported BatchNorm statistics are those of the 24 whole images (centre crops), not the
    # masked islands of pretraining (what latest.pt holds).
    exported = load(ckpt / "twistnet18_spark.pt")
    model = models.build_model("twistnet18", 10, verbose=False)
    model.load_state_dict(exported, strict=False)
    eval_tf = transforms.build_eval_transform(64)
    whole = torch.stack([eval_tf(Image.open(p).convert("RGB")) for p in sorted((probe_folder / "train").rglob("*.JPEG"))])
    assert statistics_misfits(model, whole) == []
    islands = load(ckpt / "latest.pt")["model"]
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    pretraining = {n: (islands[f"encoder.model.{n}.running_mean"], islands[f"encoder.model.{n}.running_var"])
                   for n in norms}
    assert len(statistics_misfits(model, whole, pretraining)) > len(norms) // 2   # what export would hold without


@pytest.fixture(scope="module")
def probe_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imagefolder (train/ 3 x 8, val/ 3 x 4), 72 px."""
    return fixtures.make_imagenet_folder(tmp_path_factory.mktemp("probe"), classes=3, train_per_class=8,
                                         val_per_class=4, size=72)


def test_check_flags_are_validated(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = [*TINY, "--data_dir", str(tmp_path), "--checkpoint_dir", str(tmp_path / "c")]
    for flags, message in ((["--rank_images", "-1"], "--rank_images must be >= 0"),
                           (["--rank_images", "1"], "at least 2 images"),
                           (["--bn_images", "-5"], "--bn_images must be >= 0"),
                           (["--probe_dir", str(tmp_path / "absent")], "absent")):
        assert utils.run_main(spark_script.main, [*base, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
