"""TwistNet-2D models, the timm baselines, the registry and pretrained-weight loading (introspection
and trained checkpoints: model_tools.py).

Usage:
    from models import build_model, list_models
    list_models()                                    # prints the registry table
    model = build_model("twistnet18", num_classes=47, pretrained=True)
    model = build_model("twistnet18", 47, pretrained="runs/x/best.pt")
    model = build_model("twistnet18", 47, r=4, heads=2, stages=(4,))   # STCI sweeps

    python models.py            # same table as list_models()

TwistNet-18 is ResNet-18 whose stage-3 and stage-4 blocks are TwistBlocks: a BasicBlock plus a
gated multi-head spiral-twisted channel interaction (MH-STCI) branch. Module names follow timm's
ResNet (conv1, bn1, layer1..layer4, fc) so that ResNet-18 state_dicts map onto it key for key.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.abc
import importlib.util
import inspect
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers.errors import UserError

# Direction of each head, in degrees; head d shifts towards (round cos, round sin) of its angle.
HEAD_ANGLES = (0, 45, 90, 135)
WEIGHTS_DIR_NAME = "weights"
TRANSFER_POLICIES = ("all", "stem+layer1+layer2")
DEFAULT_GATE_INIT = -2.0        # sigmoid(-2) = 0.119: a fresh STCI branch barely perturbs the backbone
# How STCI's own weights start: "paper" as the paper describes them (directional twist kernels);
# "upstream" as the paper's published code actually leaves them (see reset_stci_parameters).
STCI_INITS = ("paper", "upstream")
_STEM_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.")


# --------------------------------------------------------------------------------------------
# Errors: bad requests, as opposed to bugs (entry scripts print them as one `error:` line)
# --------------------------------------------------------------------------------------------
class ModelError(UserError):
    """A request the registry or the weight loader cannot satisfy, because of the user's input."""


class ModelConfigError(ModelError, ValueError):
    """An unknown model name, bad hyper-parameters, or a checkpoint that does not fit the model."""


class CheckpointNotFoundError(ModelError, FileNotFoundError):
    """A checkpoint path that does not exist."""


class CheckpointReadError(ModelError, RuntimeError):
    """A file torch.load(weights_only=True) cannot read, or weights that cannot be fetched."""


# --------------------------------------------------------------------------------------------
# STCI
# --------------------------------------------------------------------------------------------
def head_offset(angle_deg: float) -> tuple[int, int]:
    """(dx, dy) neighbour offset of a head: (round cos θ, round sin θ); dy points down the rows."""
    theta = math.radians(angle_deg)
    return int(round(math.cos(theta))), int(round(math.sin(theta)))


def largest_group_count(channels: int, limit: int = 32) -> int:
    """Largest number of GroupNorm groups <= limit that divides `channels`."""
    return max(g for g in range(1, min(limit, channels) + 1) if channels % g == 0)


class MultiHeadSTCI(nn.Module):
    """Multi-head spiral-twisted channel interaction, all heads computed in one batch.

    Per head: z = relu(bn(conv1x1(x))) with r channels; t = dwconv3x3(z) * scale, the kernel
    starting as 0.5 * (centre + neighbour in the head's direction); both L2-normalised over
    channels; output [z, z_i * t_j for i <= j]. Heads are concatenated, re-weighted by AIS,
    group-normalised and projected back to the input width. stci_init picks the starting
    weights ('paper' or 'upstream', see reset_stci_parameters).
    """

    def __init__(
        self,
        channels: int,
        r: int = 8,
        heads: int = 4,
        use_ais: bool = True,
        spiral: bool = True,
        eps: float = 1e-6,
        stci_init: str = "paper",
    ) -> None:
        super().__init__()
        if stci_init not in STCI_INITS:
            raise ModelConfigError(f"stci_init must be one of {', '.join(STCI_INITS)}; got {stci_init!r}")
        if not 1 <= heads <= len(HEAD_ANGLES):
            raise ModelConfigError(f"heads must be in 1..{len(HEAD_ANGLES)}, got {heads}")
        if r < 1:
            raise ModelConfigError(f"r must be >= 1, got {r}")
        self.r, self.heads, self.eps, self.spiral = r, heads, eps, spiral
        self.stci_init = stci_init
        self.angles = HEAD_ANGLES[:heads]
        self.pairs = r * (r + 1) // 2
        self.head_channels = r + self.pairs
        self.out_channels = heads * self.head_channels
        width = heads * r

        self.reduce = nn.Conv2d(channels, width, 1, bias=False)
        self.reduce_bn = nn.BatchNorm2d(width)
        if spiral:
            self.twist = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
            self.twist_scale = nn.Parameter(torch.ones(width))
        else:
            self.twist = None
            self.register_parameter("twist_scale", None)
        if use_ais:
            hidden = max(self.out_channels // 4, 16)
            self.ais = nn.Sequential(
                nn.Linear(self.out_channels, hidden), nn.ReLU(inplace=True),
                nn.Linear(hidden, self.out_channels), nn.Sigmoid(),
            )
        else:
            self.ais = None
        self.norm = nn.GroupNorm(largest_group_count(self.out_channels), self.out_channels)
        self.proj = nn.Conv2d(self.out_channels, channels, 1, bias=False)
        self.proj_bn = nn.BatchNorm2d(channels)

        rows, cols = torch.triu_indices(r, r)
        self.register_buffer("pair_i", rows, persistent=False)
        self.register_buffer("pair_j", cols, persistent=False)
        self.reset_stci_parameters()

    @torch.no_grad()
    def reset_stci_parameters(self) -> None:
        """Initialise the STCI weights according to self.stci_init.

        'paper': directional twist kernels (0.5 centre + 0.5 neighbour), the reduce conv as PyTorch
        builds it (std 1/sqrt(3 C)), projection N(0, 0.01).
        'upstream': the distributions the paper's code ends with. It builds one module per head and
        then runs kaiming_normal_(mode='fan_out') over every conv of the network, STCI included, so
        the directional kernel it wrote first is overwritten. Here the heads share one conv, so the
        fan-out is taken per head to get the same std: reduce sqrt(2 / r) (0.5 for r = 8); twist
        sqrt(2 / (9 r)) (0.167: PyTorch counts a depthwise conv's fan-out as out_channels * 9);
        projection sqrt(2 / C) (0.088 for C = 256, 0.0625 for 512). AIS, norms and the twist scale
        start as in 'paper'.
        """
        if self.stci_init == "upstream":
            for d in range(self.heads):
                rows = slice(d * self.r, (d + 1) * self.r)
                nn.init.kaiming_normal_(self.reduce.weight[rows], mode="fan_out", nonlinearity="relu")
                if self.twist is not None:
                    nn.init.kaiming_normal_(self.twist.weight[rows], mode="fan_out", nonlinearity="relu")
            if self.twist is not None:
                self.twist_scale.fill_(1.0)
            nn.init.kaiming_normal_(self.proj.weight, mode="fan_out", nonlinearity="relu")
            return
        if self.twist is not None:
            kernel = torch.zeros_like(self.twist.weight)  # [heads*r, 1, 3, 3]
            for d, angle in enumerate(self.angles):
                dx, dy = head_offset(angle)
                rows = slice(d * self.r, (d + 1) * self.r)
                kernel[rows, 0, 1, 1] += 0.5
                kernel[rows, 0, 1 + dy, 1 + dx] += 0.5
            self.twist.weight.copy_(kernel)
            self.twist_scale.fill_(1.0)
        nn.init.normal_(self.proj.weight, mean=0.0, std=0.01)

    def _normalise(self, v: torch.Tensor) -> torch.Tensor:
        # v: [B, heads, r, H, W]; unit L2 norm over each head's r channels, i.e. v / max(|v|, eps).
        # Written as a sum of squares and rsqrt: on CPU, linalg.vector_norm over this middle axis was
        # ~6x slower (forward + backward) and barely used the second thread.
        return v * (v * v).sum(dim=2, keepdim=True).clamp_min(self.eps * self.eps).rsqrt()

    def reduced(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, t) as [B, heads, r, H, W], both L2-normalised over channels."""
        z = F.relu(self.reduce_bn(self.reduce(x)), inplace=True)
        if self.twist is not None:
            t = self.twist(z) * self.twist_scale.view(1, -1, 1, 1)
        else:
            t = z
        b, _, h, w = z.shape
        z = self._normalise(z.view(b, self.heads, self.r, h, w))
        t = self._normalise(t.view(b, self.heads, self.r, h, w))
        return z, t

    def interactions(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated head outputs before AIS: [B, heads * (r + r(r+1)/2), H, W]."""
        z, t = self.reduced(x)
        products = z.index_select(2, self.pair_i) * t.index_select(2, self.pair_j)
        feats = torch.cat([z, products], dim=2)
        return feats.flatten(1, 2)

    def ais_weights(self, feats: torch.Tensor) -> torch.Tensor | None:
        """AIS channel weights [B, out_channels] for interaction features, or None without AIS."""
        if self.ais is None:
            return None
        return self.ais(feats.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.interactions(x)
        weights = self.ais_weights(feats)
        if weights is not None:
            feats = feats * weights[:, :, None, None]
        return self.proj_bn(self.proj(self.norm(feats)))


# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------
def _downsample(inplanes: int, planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == planes:
        return None
    return nn.Sequential(
        nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
    )


def _drop_path(rate: float) -> nn.Module:
    from timm.layers import DropPath
    return DropPath(rate) if rate > 0 else nn.Identity()


def _blur_pool(stride: int) -> nn.Module:
    # channels=None: the binomial filter is expanded to the input's width at run time, so the
    # layer has no per-channel state (nothing in the state_dict, nothing to fix after pruning).
    from timm.layers import BlurPool2d
    return BlurPool2d(channels=None, filt_size=3, stride=stride)


class TwistBlock(nn.Module):
    """ResNet BasicBlock with an optional gated STCI branch fed by the first conv's output."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        stci: Mapping[str, Any] | None = None,
        gate_init: float = DEFAULT_GATE_INIT,
        drop_path: float = 0.0,
        blurpool: bool = False,
    ) -> None:
        super().__init__()
        # Anti-aliased (timm's convention): a stride-1 conv, then a blur-and-subsample of h, so STCI
        # reads the downsampled h. The shortcut's 1x1 conv stays strided, as in timm's ResNet.
        blur = blurpool and stride > 1
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=1 if blur else stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.aa = _blur_pool(stride) if blur else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(inplanes, planes, stride)
        if stci is not None:
            self.stci = MultiHeadSTCI(planes, **stci)
            self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        else:
            self.stci = None
            self.register_parameter("gate", None)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        # In-place ReLU and adds on fresh BN outputs (BN's backward does not need its output), as in
        # torchvision's BasicBlock: on CPU the out-of-place copies cost as much as STCI's products.
        h = self.aa(F.relu(self.bn1(self.conv1(x)), inplace=True))
        out = self.bn2(self.conv2(h))
        if self.stci is not None:
            out.addcmul_(self.stci(h), torch.sigmoid(self.gate))
        # Stochastic depth drops the whole residual branch (convs and gated STCI) per sample.
        out = self.drop_path(out)
        out += shortcut
        return F.relu(out, inplace=True)


class TwistNet(nn.Module):
    """ResNet-18 layout with TwistBlocks in `stages` (1-based stage numbers).

    drop_path: stochastic depth; block k of the N blocks gets drop_path * k / (N - 1) (timm's ResNet
    rule: the first block never drops, the last one at the full rate). blurpool: anti-aliased
    downsampling (timm's BlurPool2d in the stem pool and the strided blocks); neither changes a
    weight name or shape, so every checkpoint and ResNet-18 transfer still maps.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        stages: Iterable[int] = (3, 4),
        r: int = 8,
        heads: int = 4,
        use_ais: bool = True,
        spiral: bool = True,
        gate_init: float = DEFAULT_GATE_INIT,
        drop_path: float = 0.0,
        blurpool: bool = False,
        stci_init: str = "paper",
    ) -> None:
        super().__init__()
        stages = tuple(sorted(set(stages)))
        if not 0.0 <= drop_path < 1.0:
            raise ModelConfigError(f"drop_path must be in [0, 1), got {drop_path}")
        if any(s not in (1, 2, 3, 4) for s in stages):
            raise ModelConfigError(f"stages must be drawn from 1..4, got {stages}")
        if stci_init not in STCI_INITS:   # checked here too: a model without STCI builds none
            raise ModelConfigError(f"stci_init must be one of {', '.join(STCI_INITS)}; got {stci_init!r}")
        self.twisted_stages = stages
        self.num_classes = num_classes
        stci_cfg = dict(r=r, heads=heads, use_ais=use_ais, spiral=spiral, stci_init=stci_init)

        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = (nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), _blur_pool(2)) if blurpool
                        else nn.MaxPool2d(3, stride=2, padding=1))
        inplanes, total, k = 64, sum(layers), 0
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            cfg = stci_cfg if index in stages else None
            stride = 1 if index == 1 else 2
            stage = []
            for b in range(blocks):
                rate = drop_path * k / max(total - 1, 1)
                stage.append(TwistBlock(inplanes, planes, stride if b == 0 else 1, cfg, gate_init, rate, blurpool))
                inplanes, k = planes, k + 1
            self.add_module(f"layer{index}", nn.Sequential(*stage))
        self.num_features = inplanes
        self.fc = nn.Linear(inplanes, num_classes)
        self._init_backbone()

    def _init_backbone(self) -> None:
        # STCI modules keep their own initialisation (directional kernels, small projection).
        stci_parts = {id(m) for s in self.modules() if isinstance(s, MultiHeadSTCI) for m in s.modules()}
        for m in self.modules():
            if id(m) in stci_parts:
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def twist_blocks(self) -> dict[str, TwistBlock]:
        """Blocks that carry an STCI branch, by module name (e.g. 'layer3.0')."""
        return twist_blocks(self)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: how to build the model, and how tables and figures name it.

    Every list of models elsewhere is derived from these entries: the TwistNet variants
    (twistnet_variants: torch.hub's hubconf.py and timm), the ablation study and its figure
    (ablation_variants), and the models SparK can pretrain (spark_models).
    """
    name: str
    group: str              # ours, ablation, fair (similar size) or large
    venue: str
    builder: Callable[..., nn.Module]
    description: str
    display: str            # name in tables, e.g. "TwistNet-18 w/o AIS"
    short: str              # name in figure legends, which share a 3.5 in column
    timm_name: str | None = None    # a timm baseline; None: a TwistNet built by this file
    spark: bool = False             # a timm baseline SparK can pretrain (TwistNets always can)

    @property
    def is_twistnet(self) -> bool:
        return self.timm_name is None

    @property
    def spark_supported(self) -> bool:
        # SparK has a mask-aware version of every operator a TwistNet is built from.
        return self.is_twistnet or self.spark


def twistnet_hyperparameters() -> tuple[str, ...]:
    """The keywords TwistNet's constructor takes besides num_classes (build_model's model_kwargs)."""
    return tuple(name for name in inspect.signature(TwistNet).parameters if name != "num_classes")


def _twistnet_builder(**fixed: Any) -> Callable[..., nn.Module]:
    unknown = sorted(set(fixed) - set(twistnet_hyperparameters()))
    if unknown:  # a typo in a registry entry fails at import, not when the variant is first trained
        raise ModelConfigError(f"TwistNet takes no {', '.join(unknown)}; it takes "
                               f"{', '.join(twistnet_hyperparameters())}")

    def build(num_classes: int, **overrides: Any) -> nn.Module:
        return TwistNet(num_classes=num_classes, **{**fixed, **overrides})
    return build


def twistnet_spec(name: str, group: str, description: str, display: str, short: str,
                  **fixed: Any) -> ModelSpec:
    """A registry entry for TwistNet with some constructor keywords fixed (an STCI variant)."""
    return ModelSpec(name, group, "-", _twistnet_builder(**fixed), description, display, short)


def _timm_builder(timm_name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        import timm
        try:
            return timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        except TypeError as error:  # a hyper-parameter this architecture does not have
            raise ModelConfigError(f"{timm_name} does not take {', '.join(sorted(kwargs))}: {error}. Model "
                                   f"hyper-parameters (model_kwargs) are for the TwistNet models; leave them "
                                   f"out for the baselines.") from None
    return build


def _spec_table() -> dict[str, ModelSpec]:
    # An STCI variant is one line here: it then appears in ablation.py, the figures, SparK,
    # torch.hub and timm. The full model is the first of group "ours".
    specs = [
        twistnet_spec("twistnet18", "ours", "TwistNet-18: STCI in stages 3-4", "TwistNet-18", "TwistNet-18"),
        twistnet_spec("twistnet18_no_spiral", "ablation", "same-position products (no directional twist)",
                      "TwistNet-18 w/o spiral twist", "w/o spiral twist", spiral=False),
        twistnet_spec("twistnet18_no_ais", "ablation", "no adaptive interaction selection",
                      "TwistNet-18 w/o AIS", "w/o AIS", use_ais=False),
        twistnet_spec("twistnet18_first_order", "ablation", "no STCI: plain ResNet-18 backbone",
                      "TwistNet-18 first-order only", "first-order only", stages=()),
    ]
    baselines = [  # name, timm name, venue, group, display, short, SparK can pretrain it
        ("resnet18", "resnet18", "CVPR 2016", "fair", "ResNet-18", "ResNet-18", True),
        ("seresnet18", "seresnet18", "CVPR 2018", "fair", "SE-ResNet-18", "SE-ResNet-18", True),
        ("convnextv2_nano", "convnextv2_nano", "CVPR 2023", "fair", "ConvNeXtV2-Nano", "ConvNeXtV2-N", False),
        ("fastvit_sa12", "fastvit_sa12", "ICCV 2023", "fair", "FastViT-SA12", "FastViT-SA12", False),
        ("efficientformerv2_s2", "efficientformerv2_s2", "ICCV 2023", "fair", "EfficientFormerV2-S2",
         "EffFormerV2-S2", False),
        ("repvit_m1_5", "repvit_m1_5", "CVPR 2024", "fair", "RepViT-M1.5", "RepViT-M1.5", False),
        ("convnext_tiny", "convnext_tiny", "CVPR 2022", "large", "ConvNeXt-Tiny", "ConvNeXt-T", False),
        ("swin_tiny", "swin_tiny_patch4_window7_224", "ICCV 2021", "large", "Swin-Tiny", "Swin-T", False),
    ]
    specs += [ModelSpec(name, group, venue, _timm_builder(timm_name), f"timm {timm_name}", display, short,
                        timm_name=timm_name, spark=spark)
              for name, timm_name, venue, group, display, short, spark in baselines]
    return {s.name: s for s in specs}


MODEL_SPECS: dict[str, ModelSpec] = _spec_table()


def model_names() -> list[str]:
    return list(MODEL_SPECS)


def twistnet_variants() -> list[str]:
    """Every TwistNet of the registry, in registry order (what hubconf.py and timm offer)."""
    return [name for name, spec in MODEL_SPECS.items() if spec.is_twistnet]


def full_model() -> str:
    """The full TwistNet, the reference of the ablation study: the first TwistNet of group 'ours'."""
    return next(name for name, spec in MODEL_SPECS.items() if spec.is_twistnet and spec.group == "ours")


def ablation_variants() -> list[str]:
    """The full model, then every TwistNet of group 'ablation' (ablation.py's rows, the figure's order)."""
    return [full_model()] + [name for name, spec in MODEL_SPECS.items()
                             if spec.is_twistnet and spec.group == "ablation"]


def spark_models() -> list[str]:
    """Registry models SparK can pretrain (every operator has a mask-aware version), in registry order."""
    return [name for name, spec in MODEL_SPECS.items() if spec.spark_supported]


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`, or a ModelConfigError that lists the names and the closest one."""
    if name in MODEL_SPECS:
        return MODEL_SPECS[name]
    close = difflib.get_close_matches(name, MODEL_SPECS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ModelConfigError(f"Unknown model '{name}'.{hint} Known models: {', '.join(MODEL_SPECS)}")


# --------------------------------------------------------------------------------------------
# Run labels: model[-tag] (train.py --tag); the sweep tags ablation.py writes and figures read
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepFamily:
    """One TwistNet hyper-parameter a sweep changes, and how a run's tag writes and reads its value.

    The tag is prefix + value text (r4, heads1, gate-4, stages234); the value goes to the model as
    model_kwargs[name].
    """
    name: str                              # ablation.py --sweeps name and the model_kwargs key
    prefix: str
    value_pattern: str                     # regex of the value text in a tag
    to_text: Callable[[Any], str]          # sweep value -> the tag's value text
    to_kwarg: Callable[[Any], Any]         # sweep value -> model_kwargs value
    reading: Callable[[str], str]          # value text -> readable, e.g. "r = 4"
    describe: Callable[[Any], str]         # sweep value -> a sentence for the ablation plan
    defaults: tuple                        # the values ablation.py sweeps unless told otherwise
    parse_value: Callable[[str], Any]      # one value as typed on ablation.py's command line
    cli_separator: str
    cli_help: str
    rank_by_length: bool = False           # stages: fewer stages first, not by the digits' value

    def tag(self, value: Any) -> str:
        return self.prefix + self.to_text(value)

    def sort_value(self, text: str) -> float:
        """Order of a value text within the family (0 for text that is not a value)."""
        if self.rank_by_length:
            return float(len(text))
        number = re.fullmatch(r"-?\d+(?:\.\d+)?", text)
        return float(number[0]) if number else 0.0


def _stage_digits(stages: Iterable[int]) -> str:
    return "".join(str(s) for s in stages)


SWEEP_FAMILIES: Mapping[str, SweepFamily] = {f.name: f for f in (
    SweepFamily("r", "r", r"\d+", lambda v: str(int(v)), int, lambda t: f"r = {t}",
                lambda v: f"r = {int(v)} channels per head", (4, 16), int, ",", "r sweep, e.g. 4,16"),
    SweepFamily("heads", "heads", r"\d+", lambda v: str(int(v)), int,
                lambda t: f"{t} head{'s' if t != '1' else ''}",
                lambda v: f"{int(v)} head(s): {', '.join(f'{a}°' for a in HEAD_ANGLES[:int(v)])}",
                (1, 2), int, ",", "heads sweep, e.g. 1,2"),
    SweepFamily("gate_init", "gate", r"-?\d+(?:\.\d+)?", lambda v: f"{float(v):g}", float,
                lambda t: f"gate init {t}", lambda v: f"gate initialised to {float(v):g}", (0.0, -4.0), float,
                ",", "gate_init sweep, e.g. --gate_init_values=0,-4"),
    SweepFamily("stages", "stages", r"\d+", _stage_digits, lambda v: [int(s) for s in v],
                lambda t: f"STCI in stage{'s' if len(t) > 1 else ''} {','.join(t)}",
                lambda v: f"STCI in stage(s) {', '.join(str(s) for s in v)}", ((4,), (2, 3, 4)),
                lambda text: tuple(int(x) for x in text.split(",")), ";",
                "stage sets separated by ';', e.g. '4;2,3,4'", rank_by_length=True),
)}


def read_sweep_tag(tag: str) -> tuple[SweepFamily, str] | None:
    """(family, value text) of a sweep tag such as 'r4' or 'gate-4'; None for any other tag."""
    for family in SWEEP_FAMILIES.values():
        if tag.startswith(family.prefix) and re.fullmatch(family.value_pattern, tag[len(family.prefix):]):
            return family, tag[len(family.prefix):]
    return None


def sweep_family_of_prefix(tag: str) -> SweepFamily | None:
    """The first family (in SWEEP_FAMILIES order) whose prefix starts `tag`: how figures rank tags."""
    return next((f for f in SWEEP_FAMILIES.values() if tag.startswith(f.prefix)), None)


def run_label(model: str, tag: str = "") -> str:
    """model[-tag]: how run directories, tables and figures name a run's model."""
    return f"{model}-{tag}" if tag else model


def split_label(label: str) -> tuple[str, str]:
    """'twistnet18-r4' -> ('twistnet18', 'r4'); registry names contain no '-'."""
    model, _, tag = label.partition("-")
    return model, tag


def display_name(label: str, short: bool = False) -> str:
    """Readable name of model[-tag], e.g. 'twistnet18-r4' -> 'TwistNet-18 (r = 4)'.

    short: the figure-legend form ('w/o AIS' rather than 'TwistNet-18 w/o AIS').
    """
    model, tag = split_label(label)
    spec = MODEL_SPECS.get(model)
    name = (spec.short if short else spec.display) if spec else model
    if not tag:
        return name
    sweep = read_sweep_tag(tag)
    return f"{name} ({sweep[0].reading(sweep[1]) if sweep else tag})"


def gate_init_of_config(config: Mapping[str, Any]) -> float | None:
    """The gate initialisation a run's config built its TwistNet with (None for other models)."""
    if not is_twistnet(str(config.get("model", ""))):
        return None
    return float((config.get("model_kwargs") or {}).get("gate_init", DEFAULT_GATE_INIT))


def is_twistnet(name: str) -> bool:
    return name in MODEL_SPECS and MODEL_SPECS[name].is_twistnet


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_model(
    name: str,
    num_classes: int = 1000,
    pretrained: bool | str | os.PathLike = False,
    transfer_policy: str = "all",
    resnet18_weights: str | os.PathLike | None = None,
    verbose: bool = True,
    log: Callable[[str], None] | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Build a registry model (build_model_with_init's model; see there)."""
    return build_model_with_init(name, num_classes, pretrained, transfer_policy, resnet18_weights, verbose, log,
                                 **model_kwargs)[0]


def build_model_with_init(
    name: str,
    num_classes: int = 1000,
    pretrained: bool | str | os.PathLike = False,
    transfer_policy: str = "all",
    resnet18_weights: str | os.PathLike | None = None,
    verbose: bool = True,
    log: Callable[[str], None] | None = None,
    **model_kwargs: Any,
) -> tuple[nn.Module, dict]:
    """Build a registry model; return it with its init record (init_record: where its weights came
    from, the file's sha256 or the hub tag, the transfer policy, mapped / skipped / left-at-init counts).

    pretrained: False (random init), a checkpoint path (TwistNet models), or True (TwistNet:
    auto-detect weights/<name>_imagenet.pt (twistnet_weight_candidates; SparK weights are used only
    when named by path, never auto-detected);
    for an ablation variant without its own file, twistnet18's loaded non-strictly (every tensor
    whose name and shape match); else ResNet-18 transfer; baselines: timm weights).
    transfer_policy: 'all' or 'stem+layer1+layer2', for the ResNet-18 fallback.
    resnet18_weights: a local timm/torchvision ResNet-18 state_dict used instead of timm's hub.
    verbose / log: what is loaded and transferred is reported with `log` (default: print when verbose).
    model_kwargs: TwistNet's constructor keywords (twistnet_hyperparameters(); see TwistNet and
    MultiHeadSTCI: stci_init 'upstream' is the paper code's initialisation); the
    timm baselines take drop_path (timm's drop_path_rate) and, resnet18/seresnet18 only, blurpool
    (timm's aa_layer=BlurPool2d).
    """
    spec = get_spec(name)
    log = log or (print if verbose else (lambda *a, **k: None))
    if not spec.is_twistnet:
        return _build_baseline(spec, num_classes, pretrained, resnet18_weights, log, **model_kwargs)

    try:
        model = spec.builder(num_classes, **model_kwargs)
    except TypeError as error:  # an unknown hyper-parameter name in model_kwargs
        raise ModelConfigError(f"{name}: {error}. TwistNet hyper-parameters are "
                               f"{', '.join(twistnet_hyperparameters())}.") from None
    if pretrained is False or pretrained is None:
        return model, scratch_init(model)
    if pretrained is True:
        found = find_twistnet_weights(name, log)
        if found is not None:
            report = load_twistnet_checkpoint(model, found, log=log)
            return model, init_record("twistnet_file", report, path=found)
        base = find_twistnet_weights("twistnet18", log) if name != "twistnet18" else None
        if base is not None:
            # What the paper's code does for its ablations: the full model's file, by name and shape.
            log(f"[Auto-detected] No weights of {name}'s own; loading TwistNet-18 weights {base} non-strictly")
            report = transfer_weights(model, extract_state_dict(load_checkpoint_file(base)), policy="all")
            log(report.summary(f"{base.name} -> {name}"))
            return model, init_record("twistnet18_file", report, path=base, policy="all")
        _warn_fallback(name, log)
        source, origin = resnet18_source(resnet18_weights, log=log)
        report = transfer_weights(model, source, policy=transfer_policy)
        log(report.summary(f"ResNet-18 -> {name} (policy '{transfer_policy}')"))
        return model, init_record("resnet18_transfer", report, policy=transfer_policy, **origin)
    report = load_twistnet_checkpoint(model, pretrained, log=log)
    return model, init_record("checkpoint", report, path=pretrained)


# --------------------------------------------------------------------------------------------
# Provenance: what started a model (results.json "init")
# --------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def init_record(source: str, report: "TransferReport", path: str | os.PathLike | None = None,
                hub_tag: str | None = None, policy: str | None = None) -> dict:
    """results.json's `init`: the source kind, the file (path and sha256) or hub tag, the transfer
    policy, and how many of the model's tensors were mapped, skipped (shape) and left at init."""
    return {"source": source, "path": str(path) if path is not None else None,
            "sha256": file_sha256(path) if path is not None else None, "hub_tag": hub_tag,
            "transfer_policy": policy, "mapped": len(report.mapped), "skipped": len(report.skipped),
            "left_at_init": len(report.left_at_init) + len(report.excluded_by_policy)}


def scratch_init(model: nn.Module) -> dict:
    return init_record("scratch", TransferReport([], [], list(model.state_dict()), []))


def init_summary(init: Mapping[str, Any] | None) -> str:
    """One line of an init record, for run headers and run listings ('' for none: an older run)."""
    if not init:
        return ""
    if init.get("source") == "scratch":
        return "init scratch (random)"
    where = (f"{init['path']} sha256 {str(init.get('sha256'))[:12]}" if init.get("path")
             else f"hub {init.get('hub_tag')}")
    policy = f", policy {init['transfer_policy']}" if init.get("transfer_policy") else ""
    return (f"init {init.get('source')}: {where}{policy}; tensors mapped {init.get('mapped')}, "
            f"skipped {init.get('skipped')}, left at init {init.get('left_at_init')}")


def _build_baseline(spec: ModelSpec, num_classes: int, pretrained: Any, resnet18_weights: Any, log: Callable,
                    drop_path: float = 0.0, blurpool: bool = False, **kwargs: Any) -> nn.Module:
    if drop_path:
        kwargs["drop_path_rate"] = drop_path  # timm's ResNet spreads it over the blocks as TwistNet does
    if blurpool:
        if spec.name not in ("resnet18", "seresnet18"):
            raise ModelConfigError(f"blurpool is available for the TwistNet models, resnet18 and seresnet18, "
                                   f"not for {spec.name}")
        from timm.layers import BlurPool2d
        kwargs["aa_layer"] = BlurPool2d
    model, init = _build_timm(spec, num_classes, pretrained, resnet18_weights, log, **kwargs)
    # timm sizes each blur filter to its input width; the 1-channel filter expanded at run time
    # computes the same and stays valid when pruning narrows the input.
    for m in model.modules():
        if type(m).__name__ == "BlurPool2d" and m.channels is not None:
            m.channels, m.filt = None, m.filt[:1].clone()
    return model, init


def _build_timm(spec: ModelSpec, num_classes: int, pretrained: Any,
                resnet18_weights: Any, log: Callable, **kwargs: Any) -> tuple[nn.Module, dict]:
    if pretrained not in (True, False, None):
        model = spec.builder(num_classes, pretrained=False, **kwargs)
        state = _pretrained_state(pretrained)
        report = transfer_weights(model, state, policy="all")
        log(report.summary(f"{pretrained} -> {spec.name}"))
        return model, init_record("checkpoint", report, path=pretrained, policy="all")
    if not pretrained:
        model = spec.builder(num_classes, pretrained=False, **kwargs)
        return model, scratch_init(model)
    if spec.name == "seresnet18":
        # timm ships no seresnet18 weights: borrow every ResNet-18 tensor whose shape matches.
        model = spec.builder(num_classes, pretrained=False, **kwargs)
        source, origin = resnet18_source(resnet18_weights, log=log)
        report = transfer_weights(model, source, policy="all")
        log(report.summary("ResNet-18 -> seresnet18"))
        return model, init_record("resnet18_transfer", report, policy="all", **origin)
    if spec.name == "resnet18" and resnet18_weights is not None:
        model = spec.builder(num_classes, pretrained=False, **kwargs)
        source, origin = resnet18_source(resnet18_weights, log=log)
        report = transfer_weights(model, source)
        log(report.summary("ResNet-18 file -> resnet18"))
        return model, init_record("resnet18_transfer", report, policy="all", **origin)
    try:
        model = spec.builder(num_classes, pretrained=True, **kwargs)
        own = list(model.state_dict())
        # timm's own weights: every tensor but a classifier resized to num_classes (timm re-inits it).
        fresh = [k for k in own if k.startswith(_classifier_prefix(model))] if num_classes != 1000 else []
        report = TransferReport([k for k in own if k not in fresh], [], fresh, [])
        return model, init_record("timm_hub", report, hub_tag=hub_tag_of(model))
    except ModelConfigError:
        raise
    except Exception as exc:  # offline hub, missing cache, ...
        raise CheckpointReadError(
            f"Could not fetch timm's pretrained weights for '{spec.name}' ({spec.timm_name}): "
            f"{type(exc).__name__}: {exc}. Connect to the Hugging Face hub once so timm caches "
            f"them, or train without --pretrained."
        ) from exc


def _classifier_prefix(model: nn.Module) -> str:
    name = getattr(model, "pretrained_cfg", {}).get("classifier") or "fc"
    return (name[0] if isinstance(name, (list, tuple)) else name) + "."


def hub_tag_of(model: nn.Module) -> str:
    """timm's name of the weights a hub model was built with, e.g. 'timm/resnet18.a1_in1k'."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    tag = f"{cfg.get('architecture', '?')}.{cfg['tag']}" if cfg.get("tag") else cfg.get("architecture", "?")
    return cfg.get("hf_hub_id") or f"timm/{tag}"


def _warn_fallback(name: str, log: Callable) -> None:
    looked = twistnet_weight_candidates(name) + (twistnet_weight_candidates() if name != "twistnet18" else [])
    msg = (f"No TwistNet ImageNet weights found for '{name}' (looked for "
           f"{', '.join(str(p) for p in looked)}). Falling back to "
           f"ResNet-18 ImageNet weights: the STCI branches start untrained. "
           f"Run pretrain_imagenet.py (see PRETRAIN_GUIDE.md) for TwistNet weights; SparK weights "
           f"(pretrain_spark.py) are used only when named: --pretrained PATH.")
    warnings.warn(msg, stacklevel=3)
    log("!" * 100 + f"\n[WARNING] {msg}\n" + "!" * 100)


# --------------------------------------------------------------------------------------------
# Weight loading
# --------------------------------------------------------------------------------------------
def twistnet_weight_candidates(name: str = "twistnet18") -> list[Path]:
    """Where pretrained TwistNet weights are looked for, in order: <name>_imagenet.pt (supervised
    ImageNet, pretrain_imagenet.py: the paper's route) under ./weights, then beside models.py.
    <name>_spark.pt (SparK, pretrain_spark.py) is never looked for: short SparK runs on small image
    sets collapse the deep layers and make fine-tuning worse, so SparK weights are used only when
    named (pretrained=PATH)."""
    here = Path(__file__).resolve().parent
    candidates = [folder / WEIGHTS_DIR_NAME / f"{name}_imagenet.pt" for folder in (Path.cwd(), here)]
    unique: dict[Path, Path] = {}
    for c in candidates:
        unique.setdefault(c.resolve(), c)
    return list(unique.values())


def find_twistnet_weights(name: str = "twistnet18", log: Callable | None = None) -> Path | None:
    """The first existing twistnet_weight_candidates(name); `log` says which, and which others exist."""
    found = [p for p in twistnet_weight_candidates(name) if p.is_file()]
    if found and log is not None:
        others = f" (also present, not used: {', '.join(map(str, found[1:]))})" if found[1:] else ""
        log(f"[Auto-detected] Found TwistNet weights: {found[0]}{others}")
    return found[0] if found else None


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """torch.load(weights_only=True) of a file a user gives; a missing or unreadable one is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"Checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():   # a plain pickle makes torch warn before it fails
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointReadError(
            f"Could not read checkpoint {path}: {unreadable_reason(path, exc)}. Expected a file "
            f"written by torch.save holding a state_dict or a dict with 'model'/'state_dict'."
        ) from None


def unreadable_reason(path: Path, exc: Exception) -> str:
    """Why torch.load(weights_only=True) failed on `path`, in words; never torch's own advice to
    retry with weights_only=False, which would run whatever code the file contains."""
    import zipfile

    if path.stat().st_size == 0:
        return "the file is empty (a copy or a save that never finished)"
    blocked = re.search(r"GLOBAL (\S+)", str(exc))
    if blocked:
        return (f"it holds Python objects that safe loading refuses ({blocked.group(1)}); files this project "
                f"writes hold only tensors and plain values. Do not load it with weights_only=False: that "
                f"would run whatever code it carries")
    if not zipfile.is_zipfile(path):
        return ("it is not a torch.save file (no complete zip archive: random bytes, a text file, a pickle, "
                "or a truncated copy)")
    first = next((line for line in str(exc).splitlines() if line.strip() and "weights_only" not in line), "")
    return f"a damaged torch.save file ({type(exc).__name__}{': ' + first.strip()[:200] if first else ''})"


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The model state_dict inside a plain state_dict or a training checkpoint, `module.` stripped."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict", "model_ema", "ema"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelConfigError("The file holds no state_dict (expected tensors by name, or a dict with 'model').")
    return {_strip_prefix(k): v for k, v in obj.items()}


def _strip_prefix(key: str) -> str:
    # DDP and torch.compile wrappers nest in either order ("_orig_mod.module." or the reverse).
    prefixes = ("module.", "_orig_mod.")
    while key.startswith(prefixes):
        key = key.split(".", 1)[1]
    return key


def _pretrained_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    raw = load_checkpoint_file(path)
    if isinstance(raw, Mapping) and raw.get("pruned_channels"):
        raise ModelConfigError(f"{path} is a pruned model (prune.py), not pretrained weights: fine-tune it with "
                               f"train.py --refine, or load it with model_tools.load_checkpoint_model")
    return extract_state_dict(raw)


def load_twistnet_checkpoint(model: nn.Module, path: str | os.PathLike, log: Callable = print) -> "TransferReport":
    """Load a TwistNet checkpoint into `model`; the classifier is skipped when its shape differs and
    left at init when the file has none (SparK's encoder weights). Returns what was loaded, skipped
    and left at init, by tensor name.

    Any other missing, unexpected or mis-shaped tensor makes the checkpoint incompatible: a
    ModelConfigError says which, because a half-loaded model would silently train from a wrong start.
    """
    state = _pretrained_state(path)
    own = model.state_dict()
    classifier = ("fc.weight", "fc.bias")
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape and k not in classifier]
    missing = [k for k in own if k not in state and k not in classifier]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        def show(keys: list[str]) -> str:
            return f"{len(keys)} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
        raise ModelConfigError(
            f"Checkpoint {path} is incompatible with {type(model).__name__} "
            f"{getattr(model, 'twisted_stages', '')}: missing {show(missing)}, unexpected "
            f"{show(unexpected)}, shape mismatch {show(mismatched)}. Was it saved from a "
            f"different model or with other TwistNet hyper-parameters ({', '.join(twistnet_hyperparameters())})?"
        )
    skip = [k for k in classifier if k in state and state[k].shape != own[k].shape]
    to_load = {k: v for k, v in state.items() if k not in skip}
    model.load_state_dict(to_load, strict=not skip and all(k in state for k in classifier))
    note = f" (classifier skipped: {tuple(state['fc.weight'].shape)} vs {tuple(own['fc.weight'].shape)})" if skip else ""
    note = note or (" (every backbone and STCI tensor; classifier left at init: not in the file)"
                    if not any(k in state for k in classifier) else "")
    log(f"[TwistNet Pretrained] Loaded {len(to_load)} tensors from {path}{note}")
    return TransferReport(mapped=list(to_load), skipped=[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in skip],
                          left_at_init=[k for k in own if k not in state], excluded_by_policy=[])


@dataclass
class TransferReport:
    """What a weight transfer did, by target tensor name."""
    mapped: list[str]
    skipped: list[tuple[str, tuple, tuple]]      # (name, source shape, target shape)
    left_at_init: list[str]                      # target tensors the source does not provide
    excluded_by_policy: list[str]                # in the source, but outside the policy
    unused: list[str] = field(default_factory=list)   # source tensors the model has no place for

    def summary(self, title: str) -> str:
        total = len(self.mapped) + len(self.skipped) + len(self.left_at_init) + len(self.excluded_by_policy)
        lines = [f"[Weight transfer] {title}",
                 f"  mapped:        {len(self.mapped):4d} tensors",
                 f"  skipped:       {len(self.skipped):4d} tensors (shape mismatch)"]
        lines += [f"      {n}: source {s} vs model {t}" for n, s, t in self.skipped[:6]]
        lines.append(f"  left at init:  {len(self.left_at_init) + len(self.excluded_by_policy):4d} tensors "
                     f"({len(self.left_at_init)} not in source, {len(self.excluded_by_policy)} outside the policy)")
        lines.append(f"  of {total} tensors in the model")
        if self.unused:
            lines.append(f"  not used:      {len(self.unused):4d} source tensors the model lacks "
                         f"(e.g. {', '.join(self.unused[:2])})")
        return "\n".join(lines)


def transfer_weights(model: nn.Module, source: Mapping[str, torch.Tensor],
                            policy: str = "all") -> TransferReport:
    """Copy tensors of a (ResNet-18) state_dict into `model` by name where shapes match.

    policy 'all' takes every matching tensor; 'stem+layer1+layer2' only those of the stem and the
    first two stages (what the paper's code loaded).
    """
    if policy not in TRANSFER_POLICIES:
        raise ModelConfigError(f"Unknown transfer policy '{policy}'; choose from {TRANSFER_POLICIES}")
    source = {_strip_prefix(k): v for k, v in source.items()}
    own = model.state_dict()
    report = TransferReport([], [], [], [])
    update = {}
    for key, target in own.items():
        if key not in source:
            report.left_at_init.append(key)
        elif policy != "all" and not key.startswith(_STEM_PREFIXES):
            report.excluded_by_policy.append(key)
        elif source[key].shape != target.shape:
            report.skipped.append((key, tuple(source[key].shape), tuple(target.shape)))
        else:
            update[key] = source[key]
            report.mapped.append(key)
    report.unused = [key for key in source if key not in own]
    model.load_state_dict(update, strict=False)
    return report


def load_resnet18_state_dict(path: str | os.PathLike | None = None,
                             log: Callable = print) -> dict[str, torch.Tensor]:
    """ResNet-18 ImageNet weights: a local timm/torchvision file if given, else timm's (hub)."""
    return resnet18_source(path, log)[0]


def resnet18_source(path: str | os.PathLike | None = None,
                    log: Callable = print) -> tuple[dict[str, torch.Tensor], dict]:
    """load_resnet18_state_dict's weights and where they came from ({'path': ...} or {'hub_tag': ...})."""
    if path is not None:
        log(f"[ResNet-18] Loading local weights: {path}")
        return extract_state_dict(load_checkpoint_file(path)), {"path": path}
    try:
        import timm
        hub = timm.create_model("resnet18", pretrained=True)
        return hub.state_dict(), {"hub_tag": hub_tag_of(hub)}
    except Exception as exc:
        raise CheckpointReadError(
            f"Could not fetch timm's ResNet-18 weights ({type(exc).__name__}: {exc}). Pass a local "
            f"file (resnet18_weights=... / --resnet18_weights) holding a timm or torchvision "
            f"ResNet-18 state_dict, or use pretrained=False."
        ) from exc


# --------------------------------------------------------------------------------------------
# Wrappers, the TwistBlocks of a model, and the registry table
# --------------------------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DDP wrappers (nested in either order)."""
    while True:
        inner = next((m for m in (getattr(model, "_orig_mod", None), getattr(model, "module", None))
                      if isinstance(m, nn.Module)), None)
        if inner is None:
            return model
        model = inner


def twist_blocks(model: nn.Module) -> dict[str, TwistBlock]:
    """TwistBlocks that carry an STCI branch, by module name (e.g. 'layer3.0'); {} for other models."""
    return {n: m for n, m in unwrap_model(model).named_modules() if isinstance(m, TwistBlock) and m.stci is not None}


def list_models(num_classes: int = 1000, file: Any = None) -> list[dict]:
    """Print and return name, params, group and venue per registry model (FLOPs: compute_flops.py)."""
    rows = [dict(name=name, params=count_params(build_model(name, num_classes, verbose=False)),
                 group=spec.group, venue=spec.venue, description=spec.description)
            for name, spec in MODEL_SPECS.items()]
    print(f"{'model':24s} {'params':>10s}  {'group':9s} {'venue':10s} description", file=file)
    for r in rows:
        print(f"{r['name']:24s} {r['params'] / 1e6:9.2f}M  {r['group']:9s} {r['venue']:10s} {r['description']}",
              file=file)
    return rows


# --------------------------------------------------------------------------------------------
# timm: every registry TwistNet is a timm model (timm.create_model("twistnet18", num_classes=47))
# --------------------------------------------------------------------------------------------
# Keywords timm.create_model (and timm's train.py) pass that TwistNet has no use for at these
# values; any other value is refused rather than silently ignored.
_TIMM_FIXED = {"in_chans": (3, "TwistNet's stem takes RGB images"),
               "drop_rate": (0.0, "TwistNet has no dropout before its classifier"),
               "global_pool": ("avg", "TwistNet pools by the mean")}
_TIMM_IGNORED = ("pretrained_cfg", "cache_dir")   # TwistNet's weights come from weights/, not timm's hub


def timm_pretrained_cfg(name: str, num_classes: int = 1000) -> dict[str, Any]:
    """What timm's utilities (resolve_data_config, ...) read from model.pretrained_cfg: the input,
    normalisation and evaluation crop train.py uses (resize 256, crop 224)."""
    return dict(architecture=name, url="", num_classes=num_classes, input_size=(3, 224, 224), pool_size=(7, 7),
                crop_pct=0.875, interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                first_conv="conv1", classifier="fc")


def create_for_timm(name: str, pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
    """build_model(name, ...) called the way timm.create_model calls a model's entry point.

    num_classes and TwistNet's own keywords pass through; drop_path_rate is TwistNet's drop_path;
    pretrained=True is build_model's weights/ lookup (pretrained_cfg_overlay=dict(file=...), what
    timm's train.py --pretrained-path sends, loads that file instead); device/dtype move the model.
    """
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    num_classes = kwargs.pop("num_classes", 1000)
    for key in _TIMM_IGNORED:
        kwargs.pop(key, None)
    for key, (allowed, why) in _TIMM_FIXED.items():
        value = kwargs.pop(key, None)
        if value is not None and value != allowed:
            raise ModelConfigError(f"timm.create_model('{name}', {key}={value!r}): {why}; leave {key} out "
                                   f"or set it to {allowed!r}")
    if "drop_path_rate" in kwargs:
        kwargs["drop_path"] = kwargs.pop("drop_path_rate")
    unknown = sorted(set(kwargs) - set(twistnet_hyperparameters()))
    if unknown:
        raise ModelConfigError(
            f"timm.create_model('{name}') got {', '.join(unknown)}, which TwistNet does not take. It takes "
            f"pretrained, num_classes, drop_path_rate, in_chans=3, drop_rate=0, global_pool='avg' and its own "
            f"{', '.join(twistnet_hyperparameters())}.")
    if pretrained and overlay.get("file"):
        pretrained = overlay["file"]
    model = build_model(name, num_classes, pretrained=pretrained, **kwargs)
    model.pretrained_cfg = model.default_cfg = timm_pretrained_cfg(name, num_classes)
    return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model


def _timm_entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_for_timm(name, pretrained, **kwargs)
    spec = get_spec(name)
    entrypoint.__name__ = entrypoint.__qualname__ = name   # timm registers a function under its name
    entrypoint.__doc__ = f"{spec.display}: {spec.description} (models.py registry; see create_for_timm)."
    entrypoint.twistnet_entrypoint = True  # type: ignore[attr-defined]
    return entrypoint


def register_with_timm() -> None:
    """Register every registry TwistNet with timm. Repeating it (models.py imported again, a variant
    added) replaces this file's own earlier entries quietly; a timm model of the same name is kept."""
    import timm.models

    module = sys.modules[__name__]
    had_all = hasattr(module, "__all__")
    for name in twistnet_variants():
        if timm.models.is_model(name) and not getattr(timm.models.model_entrypoint(name), "twistnet_entrypoint", False):
            warnings.warn(f"timm already has a model '{name}': timm.create_model('{name}') stays timm's")
            continue
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=f"Overwriting {name} in registry")
            timm.models.register_model(_timm_entrypoint(name))
    if not had_all and hasattr(module, "__all__"):
        del module.__all__   # timm lists its entry points there; `from models import *` keeps every name


class _ThenRegisterWithTimm(importlib.abc.Loader):
    """timm's own loader, which registers the TwistNets once timm's package has run."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def __getattr__(self, attribute: str) -> Any:   # is_package, get_resource_reader, ...
        return getattr(self.loader, attribute)

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        _remove_timm_hook()
        try:
            register_with_timm()
        except Exception as error:  # never break `import timm` for code that does not use TwistNet
            warnings.warn(f"TwistNet models not registered with timm: {type(error).__name__}: {error}")


class _RegisterWhenTimmIsImported(importlib.abc.MetaPathFinder):
    """Registers the TwistNets with timm when timm is first imported. Importing timm costs seconds,
    which the scripts that never use it (summarize_runs.py, ...) should not pay for importing models.
    It stays until timm is actually imported: a mere importlib.util.find_spec("timm") (torch.hub's
    dependency check) must not use it up."""

    searching = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "timm" or self.searching:
            return None
        self.searching = True          # the search below asks this finder too
        try:
            spec = importlib.util.find_spec("timm")
        finally:
            self.searching = False
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegisterWithTimm(spec.loader)
        return spec


def _remove_timm_hook() -> None:
    # By class name: a second import of this file (importlib.reload) has its own class object.
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != _RegisterWhenTimmIsImported.__name__]


def _register_with_timm_now_or_on_import() -> None:
    _remove_timm_hook()
    if "timm" in sys.modules:
        register_with_timm()
    else:
        sys.meta_path.insert(0, _RegisterWhenTimmIsImported())


_register_with_timm_now_or_on_import()


if __name__ == "__main__":
    list_models()
