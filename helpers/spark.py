"""SparK masked image modelling for TwistNet-18 and the registry's ResNets: the method (pretrain_spark.py trains with it).

Usage:
    import models, spark
    net = spark.build_spark_model("twistnet18", mask_ratio=0.6)      # encoder + light decoder + loss
    loss = net(images)                     # images [B, 3, H, W] with H, W multiples of 32; a random mask
    loss = net(images, active)             # or a given mask: active [B, 1, H/32, W/32], True = visible
    shown = net.reconstruct(images)        # masked input, reconstruction and composite, for figures
    torch.save(net.encoder_state_dict(), "weights/twistnet18_spark.pt")   # registry names, no classifier
    spark.reconstruction_grid(shown).save("grid.png")   # input | masked | reconstruction | visible pasted back

    encoder = spark.SparkEncoder(models.build_model("resnet18"))
    active = spark.random_active_mask(8, 7, 7, 0.6, generator=torch.Generator().manual_seed(0))
    stages = encoder(images, active)       # the four stage maps, computed mask-aware

SparK (Tian et al., "Designing BERT for convolutional networks: sparse and hierarchical masked
modeling", ICLR 2023) pretrains a CNN without labels by reconstructing masked patches:
- the mask patch is the encoder's downsample ratio (32 here); a random `mask_ratio` of the patches
  of each image is dropped, exactly round(h * w * (1 - mask_ratio)) patches stay visible; the mask
  is drawn at the coarsest feature map and upsampled to every resolution;
- masked pixels are zeroed and every operator of the encoder is made mask-aware with dense PyTorch
  ops, so the encoder behaves like a sparse CNN that sees the visible patches only: conv and
  max-pool outputs are re-masked, BatchNorm takes its statistics (and running statistics) over
  visible positions only, and so do TwistNet's STCI GroupNorm and AIS pooling and the SE pooling of
  seresnet18. Masked positions stay exactly zero at every layer, so nothing of a masked patch can
  reach a visible one;
- a light UNet-like decoder takes the four stage maps, each "densified" (normalised over visible
  positions, masked positions filled with a learned mask token, projected to the decoder width),
  and predicts per-patch normalised pixels; the loss is the mean squared error on masked patches.

The encoder is the registry model itself: its modules are switched in place to mask-aware
subclasses that keep every parameter and buffer name, so `encoder.model.state_dict()` loads into
`models.build_model(name, ...)` with strict=True. Outside an encoder call (no mask set) those
modules compute exactly what the originals do. Parameters the features never use (the classifier)
are frozen, so the optimizer and DistributedDataParallel see only what pretraining trains.
Convert only `decoder` and `densify` with nn.SyncBatchNorm.convert_sync_batchnorm: converting the
encoder would replace its mask-aware BatchNorm with a plain one.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from PIL import Image, ImageDraw

import models
import transforms
from helpers import model_tools, recipes

DOWNSAMPLE_RATIO = 32           # stem /4, stages 2-4 /2 each: the mask patch size
DEFAULT_MASK_RATIO = 0.6
# SparK used 768 for every encoder (ResNet-50's last stage has 2048 channels). For ResNet-18 and
# TwistNet-18 (512) that makes decoder + densify 24.7M parameters beside an 11.6M encoder; at 512
# they are 11.1M and the coarsest densify projection is an identity, SparK's rule for equal widths.
DEFAULT_DECODER_WIDTH = 512
STAGES = ("layer1", "layer2", "layer3", "layer4")
TITLE_HEIGHT = 12               # pixels above the reconstruction grid's columns
FEATURE_PATH = ("conv1", "bn1", "act1", "maxpool") + STAGES   # the modules forward_features runs


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------
def num_visible(h: int, w: int, mask_ratio: float) -> int:
    """Visible patches per image of an h x w patch grid: round(h w (1 - mask_ratio)), at least one
    visible and one masked."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    patches = h * w
    if patches < 2:
        raise ValueError(f"A {h} x {w} patch grid cannot hold a visible and a masked patch: images must be "
                         f"at least {2 * DOWNSAMPLE_RATIO} px on one side (the mask patch is {DOWNSAMPLE_RATIO} px).")
    return min(max(round(patches * (1.0 - mask_ratio)), 1), patches - 1)


def random_active_mask(batch: int, h: int, w: int, mask_ratio: float = DEFAULT_MASK_RATIO,
                       generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """A bool mask [batch, 1, h, w] (True = visible) with exactly num_visible(h, w, mask_ratio)
    visible patches per image, drawn uniformly; drawn on the generator's device, returned on `device`."""
    keep = num_visible(h, w, mask_ratio)
    scores = torch.rand(batch, h * w, generator=generator,
                        device=generator.device if generator is not None else None)
    chosen = scores.argsort(dim=1)[:, :keep]
    active = torch.zeros(batch, h * w, dtype=torch.bool, device=scores.device).scatter_(1, chosen, True)
    return active.view(batch, 1, h, w).to(device if device is not None else scores.device)


def upsample_mask(active: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The coarse mask [B, 1, h, w] repeated to [B, 1, height, width] (each factor an integer)."""
    h, w = active.shape[-2:]
    if height % h or width % w:
        raise ValueError(f"A {height} x {width} map is not a whole multiple of the {h} x {w} mask grid")
    return active.repeat_interleave(height // h, dim=2).repeat_interleave(width // w, dim=3)


class MaskState:
    """The mask of the encoder call in progress, shared by the mask-aware modules of one encoder.

    `at(x)` gives the mask [B, 1, H, W] at x's resolution (True = visible), or None outside an
    encoder call, when every mask-aware module computes what its dense original computes.
    """

    def __init__(self) -> None:
        self.active: torch.Tensor | None = None
        self._by_size: dict[tuple[int, int], torch.Tensor] = {}

    @contextlib.contextmanager
    def applied(self, active: torch.Tensor) -> Iterator[None]:
        self.active, self._by_size = active, {}
        try:
            yield
        finally:
            self.active, self._by_size = None, {}

    def at(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.active is None:
            return None
        size = (x.shape[-2], x.shape[-1])
        if size not in self._by_size:
            self._by_size[size] = upsample_mask(self.active, *size)
        return self._by_size[size]


# --------------------------------------------------------------------------------------------
# Mask-aware operations (dense ops; masked positions come out exactly zero)
# --------------------------------------------------------------------------------------------
def batch_norm_visible(x: torch.Tensor, active: torch.Tensor, norm: nn.BatchNorm2d) -> torch.Tensor:
    """BatchNorm whose batch statistics, and the running statistics updated from them, come from
    the visible positions only; masked positions come out zero.

    The running statistics are updated as nn.BatchNorm2d does (momentum, or a cumulative average
    with momentum=None; unbiased variance). In eval mode they normalise every position alike.
    Written with dense masked moments rather than BatchNorm over the gathered visible positions
    (SparK's way): no host sync, any memory format, and 1.6-3x faster on CPU (measured at 32 x 64 x 32 x 32).
    """
    if not (norm.training or norm.running_mean is None):
        return nn.BatchNorm2d.forward(norm, x) * active
    c = x.shape[1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    weight = active.to(dtype)
    count = weight.sum(dim=(0, 2, 3)).clamp_min(1)        # [1]: every channel has the same positions
    values = x.to(dtype)
    mean = (values * weight).sum(dim=(0, 2, 3)) / count
    centred = (values - mean.view(1, c, 1, 1)) * weight
    var = centred.square().sum(dim=(0, 2, 3)) / count
    scale = torch.rsqrt(var + norm.eps)
    if norm.affine:
        out = centred * (scale * norm.weight).view(1, c, 1, 1) + norm.bias.view(1, c, 1, 1)
    else:
        out = centred * scale.view(1, c, 1, 1)
    if norm.training and norm.track_running_stats:
        _update_running_stats(norm, mean.detach(), var.detach(), count)
    return (out * weight).to(x.dtype)


@torch.no_grad()
def _update_running_stats(norm: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
    norm.num_batches_tracked.add_(1)
    factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    unbiased = var * count / (count - 1).clamp_min(1)
    norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
    norm.running_var.lerp_(unbiased.to(norm.running_var.dtype), factor)


def group_norm_visible(x: torch.Tensor, active: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm with each (image, group)'s statistics over its visible positions; computed in at
    least float32, as autocast runs GroupNorm."""
    b, c, h, w = x.shape
    groups = norm.num_groups
    dtype = torch.promote_types(x.dtype, torch.float32)
    weight = active.to(dtype).view(b, 1, 1, h * w)
    grouped = x.to(dtype).reshape(b, groups, c // groups, h * w)
    count = (weight.sum(dim=(2, 3), keepdim=True) * (c // groups)).clamp_min(1)
    mean = (grouped * weight).sum(dim=(2, 3), keepdim=True) / count
    centred = (grouped - mean) * weight
    var = centred.square().sum(dim=(2, 3), keepdim=True) / count
    out = (centred * torch.rsqrt(var + norm.eps)).view(b, c, h, w)
    if norm.affine:
        out = out * norm.weight.view(1, c, 1, 1) + norm.bias.view(1, c, 1, 1)
    return out * active


def visible_mean(x: torch.Tensor, active: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Global average pool over the visible positions of each image: [B, C] (or [B, C, 1, 1])."""
    weight = active.to(x.dtype)
    total = (x * weight).sum(dim=(2, 3), keepdim=keepdim)
    return total / weight.sum(dim=(2, 3), keepdim=keepdim).clamp_min(1)


# --------------------------------------------------------------------------------------------
# Mask-aware module classes: subclasses of the originals, switched in place (same state_dict)
# --------------------------------------------------------------------------------------------
class MaskAware:
    """Mixin of the mask-aware classes. `spark_mask` is the owning encoder's MaskState;
    `pooled_children` names children that see pooled vectors only and stay as they are
    (None: all of them)."""
    spark_mask: MaskState
    pooled_children: tuple[str, ...] | None = ()


class MaskedConv2d(MaskAware, nn.Conv2d):
    """Conv2d whose output is re-masked: a dense stand-in for a submanifold sparse conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        active = self.spark_mask.at(out)
        return out if active is None else out * active


class MaskedMaxPool2d(MaskAware, nn.MaxPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        active = self.spark_mask.at(out)
        return out if active is None else out * active


class MaskedBatchNorm2d(MaskAware, nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.spark_mask.at(x)
        return super().forward(x) if active is None else batch_norm_visible(x, active, self)


class MaskedGroupNorm(MaskAware, nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.spark_mask.at(x)
        return super().forward(x) if active is None else group_norm_visible(x, active, self)


class MaskedSTCI(MaskAware, models.MultiHeadSTCI):
    """STCI whose AIS pools over visible positions (its convs, BatchNorms and GroupNorm are
    switched separately; AIS's Linear layers see the pooled vector only)."""
    pooled_children = ("ais",)

    def ais_weights(self, feats: torch.Tensor) -> torch.Tensor | None:
        active = self.spark_mask.at(feats)
        if self.ais is None or active is None:
            return super().ais_weights(feats)
        return self.ais(visible_mean(feats, active))


@functools.cache
def _masked_se_classes() -> tuple[type, type]:
    """(timm's SEModule, its mask-aware subclass); timm is imported for timm models only (it is slow)."""
    from timm.layers import SEModule

    class MaskedSEModule(MaskAware, SEModule):
        """timm's SE module squeezing over visible positions (the rest as in SEModule.forward)."""
        pooled_children = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            active = self.spark_mask.at(x)
            if active is None:
                return super().forward(x)
            squeezed = visible_mean(x, active, keepdim=True)
            if self.add_maxpool:
                peak = x.masked_fill(~active, float("-inf")).amax(dim=(2, 3), keepdim=True)
                squeezed = 0.5 * squeezed + 0.5 * peak
            return x * self.gate(self.fc2(self.act(self.bn(self.fc1(squeezed)))))

    return SEModule, MaskedSEModule


def _mask_aware_classes(timm_model: bool) -> dict[type, type]:
    classes: dict[type, type] = {nn.Conv2d: MaskedConv2d, nn.MaxPool2d: MaskedMaxPool2d,
                                 nn.BatchNorm2d: MaskedBatchNorm2d, nn.GroupNorm: MaskedGroupNorm,
                                 models.MultiHeadSTCI: MaskedSTCI}
    if timm_model:
        se_module, masked_se = _masked_se_classes()
        classes[se_module] = masked_se
    return classes


def _pass_through_classes(timm_model: bool) -> tuple[type, ...]:
    """Modules that need no mask: containers, and pointwise maps that keep zeros at zero."""
    classes: tuple[type, ...] = (nn.Sequential, nn.ReLU, nn.Identity, models.TwistBlock)
    if timm_model:
        from timm.layers import DropPath
        from timm.models.resnet import BasicBlock
        classes += (BasicBlock, DropPath)
    return classes


def _unsupported(what: str) -> models.ModelConfigError:
    return models.ModelConfigError(f"SparK pretraining has no mask-aware version of {what}. "
                                   f"Supported models: {', '.join(models.spark_models())}.")


def _make_mask_aware(module: nn.Module, name: str, state: MaskState, timm_model: bool) -> None:
    """Switch `module` and its descendants to their mask-aware classes, all sharing `state`."""
    swaps, passing = _mask_aware_classes(timm_model), _pass_through_classes(timm_model)
    cls = type(module)
    if cls in swaps:
        if isinstance(module, nn.MaxPool2d) and module.return_indices:
            raise _unsupported(f"a MaxPool2d returning indices (at '{name}')")
        module.__class__ = swaps[cls]
        module.spark_mask = state
        skip = module.pooled_children
        if skip is None:
            return
    elif cls in passing:
        skip = ()
    else:
        raise _unsupported(f"{cls.__module__}.{cls.__qualname__} (at '{name}')")
    for child_name, child in module.named_children():
        if child_name not in skip:
            _make_mask_aware(child, f"{name}.{child_name}", state, timm_model)


def check_spark_model(name: str) -> None:
    """ModelConfigError unless `name` is a registry model SparK can pretrain."""
    models.get_spec(name)  # an unknown name: the registry's own error, with the closest match
    if name not in models.spark_models():
        raise models.ModelConfigError(f"SparK pretraining does not support '{name}' (it needs a CNN whose every "
                                      f"operator has a mask-aware version). "
                                      f"Supported: {', '.join(models.spark_models())}.")


def _is_timm_resnet(model: nn.Module) -> bool:
    return type(model).__name__ == "ResNet" and type(model).__module__.startswith("timm.")


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------
class SparkEncoder(nn.Module):
    """A registry CNN (TwistNet-18 and its variants, timm resnet18 / seresnet18) made mask-aware.

    encoder(images, active) -> [layer1, layer2, layer3, layer4] outputs, for images [B, 3, H, W]
    and active, a bool [B, 1, H/32, W/32] (True = visible). Masked pixels are zeroed; the maps are
    exactly zero at masked positions, and their visible positions do not depend on masked pixels.
    The model's modules are switched in place (see the module docstring), so build a new model
    for a second encoder.
    """
    downsample_ratio = DOWNSAMPLE_RATIO

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        timm_model = _is_timm_resnet(model)
        if not (isinstance(model, models.TwistNet) or timm_model):
            raise _unsupported(f"{type(model).__module__}.{type(model).__qualname__}")
        if any(isinstance(m, MaskAware) for m in model.modules()):
            raise ValueError("This model is already inside a SparkEncoder; build a fresh one.")
        self.masks = MaskState()
        for name in FEATURE_PATH:
            child = getattr(model, name, None)
            if child is not None:
                _make_mask_aware(child, name, self.masks, timm_model)
        for name, param in model.named_parameters():
            if name.split(".", 1)[0] not in FEATURE_PATH:
                param.requires_grad_(False)
        self.model = model
        self.feature_channels = [getattr(model, stage)[-1].conv2.out_channels for stage in STAGES]

    def check_inputs(self, images: torch.Tensor, active: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[-2] % self.downsample_ratio or images.shape[-1] % self.downsample_ratio:
            raise ValueError(f"images must be [B, C, H, W] with H and W multiples of {self.downsample_ratio}, "
                             f"got {tuple(images.shape)}")
        grid = (images.shape[0], 1, images.shape[-2] // self.downsample_ratio,
                images.shape[-1] // self.downsample_ratio)
        if active.dtype != torch.bool or tuple(active.shape) != grid:
            raise ValueError(f"active must be a bool tensor of shape {grid} for images {tuple(images.shape)}, "
                             f"got {active.dtype} {tuple(active.shape)}")

    def forward(self, images: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
        self.check_inputs(images, active)
        masked = images * upsample_mask(active, images.shape[-2], images.shape[-1])
        stages = {name: getattr(self.model, name) for name in STAGES}
        with self.masks.applied(active), model_tools.capture(stages, detach=False) as outputs:
            self.model.forward_features(masked)
        return [outputs[name] for name in STAGES]


# --------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------
class UpBlock(nn.Module):
    """x2 upsampling (transposed conv), then two 3x3 convs with BatchNorm: SparK's UNet block."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, 3, padding=1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x))


class LightDecoder(nn.Module):
    """log2(32) = 5 UpBlocks halving the width from `width`, then a 1x1 conv to pixels.

    forward(features): features[i] (i = 0 the coarsest, `width / 2**i` channels) is added before
    block i; the output has the input image's resolution and 3 channels.
    """

    def __init__(self, width: int = DEFAULT_DECODER_WIDTH, upsample_ratio: int = DOWNSAMPLE_RATIO) -> None:
        super().__init__()
        blocks = upsample_ratio.bit_length() - 1
        if upsample_ratio != 1 << blocks:
            raise ValueError(f"upsample_ratio must be a power of 2, got {upsample_ratio}")
        if width % upsample_ratio:
            raise ValueError(f"decoder width must be a multiple of {upsample_ratio} (it halves {blocks} times), got {width}")
        self.width = width
        widths = [width >> i for i in range(blocks + 1)]
        self.blocks = nn.ModuleList(UpBlock(cin, cout) for cin, cout in zip(widths[:-1], widths[1:]))
        self.proj = nn.Conv2d(widths[-1], 3, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x: torch.Tensor | int = 0
        for i, block in enumerate(self.blocks):
            if i < len(features):
                x = x + features[i]
            x = block(x)
        return self.proj(x)


class Densify(nn.Module):
    """One stage's encoder map made dense for the decoder: BatchNorm over visible positions, masked
    positions filled with a learned mask token, a projection to the decoder width there."""

    def __init__(self, channels: int, width: int, coarsest: bool) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.mask_token = nn.Parameter(torch.zeros(1, channels, 1, 1))
        nn.init.trunc_normal_(self.mask_token, mean=0.0, std=0.02, a=-0.02, b=0.02)
        if coarsest and channels == width:
            self.proj: nn.Module = nn.Identity()
        else:
            kernel = 1 if coarsest else 3
            self.proj = nn.Conv2d(channels, width, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] (an encoder stage map), active [B, 1, H, W] (True = visible)."""
        x = batch_norm_visible(x, active, self.norm)
        x = torch.where(active, x, self.mask_token.to(x.dtype))
        return self.proj(x)


# --------------------------------------------------------------------------------------------
# Targets and loss
# --------------------------------------------------------------------------------------------
def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, h p, w p] -> [B, h w, p p C], patches in row-major order (as active.flatten(1))."""
    b, c, height, width = images.shape
    h, w = height // patch, width // patch
    x = images.reshape(b, c, h, patch, w, patch)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, h * w, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, h: int, w: int) -> torch.Tensor:
    """Inverse of patchify for an h x w patch grid."""
    b = patches.shape[0]
    c = patches.shape[-1] // (patch * patch)
    x = patches.reshape(b, h, w, patch, patch, c)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, h * patch, w * patch)


def normalised_patches(images: torch.Tensor, patch: int, eps: float = 1e-6
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target, mean, std): every patch's pixels standardised by its own mean and std (SparK's
    target; std = sqrt(unbiased var + eps))."""
    patches = patchify(images, patch)
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps).sqrt()
    return (patches - mean) / std, mean, std


def masked_patch_loss(prediction: torch.Tensor, images: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the prediction and the per-patch normalised images, averaged
    over the masked patches only (visible ones do not count)."""
    patch = images.shape[-1] // active.shape[-1]
    target, _, _ = normalised_patches(images, patch)
    per_patch = (patchify(prediction, patch) - target).square().mean(dim=-1)   # [B, L]
    masked = (~active).flatten(1).to(per_patch.dtype)
    return (per_patch * masked).sum() / masked.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------
# Encoder + decoder + loss
# --------------------------------------------------------------------------------------------
@dataclass
class SparkReconstruction:
    """What SparkModel.reconstruct returns, all [B, 3, H, W] in the input's pixel space except
    `active` ([B, 1, h, w]) and `loss`."""
    loss: torch.Tensor
    active: torch.Tensor
    images: torch.Tensor            # the input
    masked: torch.Tensor            # the input with masked patches zeroed (what the encoder saw)
    reconstruction: torch.Tensor    # the prediction, per-patch statistics of the input restored
    composite: torch.Tensor         # visible patches from the input, masked ones from the prediction


class SparkModel(nn.Module):
    """SparK: SparkEncoder(model) + densify layers + LightDecoder + masked-patch loss.

    forward(images, active=None, generator=None) -> the loss; without `active` a random mask
    with `mask_ratio` is drawn (from `generator` if given).
    """

    def __init__(self, model: nn.Module, mask_ratio: float = DEFAULT_MASK_RATIO,
                 decoder_width: int = DEFAULT_DECODER_WIDTH) -> None:
        super().__init__()
        num_visible(2, 1, mask_ratio)  # validates the ratio
        self.mask_ratio = mask_ratio
        self.encoder = SparkEncoder(model)
        self.decoder = LightDecoder(decoder_width, DOWNSAMPLE_RATIO)
        coarse_first = list(reversed(self.encoder.feature_channels))
        self.densify = nn.ModuleList(Densify(channels, decoder_width >> i, coarsest=i == 0)
                                     for i, channels in enumerate(coarse_first))

    @property
    def downsample_ratio(self) -> int:
        return self.encoder.downsample_ratio

    def random_mask(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random mask for this batch, on its device."""
        b, _, height, width = images.shape
        return random_active_mask(b, height // self.downsample_ratio, width // self.downsample_ratio,
                                  self.mask_ratio, generator, device=images.device)

    def predict(self, images: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The decoder's output [B, 3, H, W], in per-patch normalised pixel space."""
        features = self.encoder(images, active)[::-1]   # coarsest first
        dense = [stage(feat, upsample_mask(active, *feat.shape[-2:]))
                 for stage, feat in zip(self.densify, features)]
        return self.decoder(dense)

    def forward(self, images: torch.Tensor, active: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        if active is None:
            active = self.random_mask(images, generator)
        return masked_patch_loss(self.predict(images, active), images, active)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, active: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> SparkReconstruction:
        """Loss, masked input, reconstruction and composite, for figures (no gradients; the
        BatchNorm running statistics update in train mode as in forward)."""
        if active is None:
            active = self.random_mask(images, generator)
        prediction = self.predict(images, active)
        patch = self.downsample_ratio
        h, w = active.shape[-2:]
        _, mean, std = normalised_patches(images, patch)
        pixels = unpatchify(patchify(prediction, patch) * std + mean, patch, h, w)
        visible = upsample_mask(active, images.shape[-2], images.shape[-1])
        return SparkReconstruction(
            loss=masked_patch_loss(prediction, images, active), active=active, images=images, masked=images * visible,
            reconstruction=pixels, composite=torch.where(visible, images, pixels))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights: the registry model's state_dict without the classifier, which
        pretraining never trains (models.load_twistnet_checkpoint leaves it at init)."""
        return encoder_weights(self.state_dict())

    def param_groups(self) -> list[dict]:
        """The trained parameters in two optimizer groups, with `weight_decay` 1.0 (conv and linear
        weights) and 0.0 (norm weights, biases, STCI gates and the mask tokens, as in SparK): the
        trainer multiplies by its weight decay schedule."""
        decay, no_decay = recipes.decay_param_groups(self, 1.0)
        tokens = {id(d.mask_token) for d in self.densify}
        no_decay["params"] += [p for p in decay["params"] if id(p) in tokens]
        decay["params"] = [p for p in decay["params"] if id(p) not in tokens]
        return [decay, no_decay]


def encoder_weights(state: Mapping[str, torch.Tensor], prefix: str = "encoder.model.") -> dict[str, torch.Tensor]:
    """The registry model's weights in a SparkModel state_dict (its keys under `prefix`), without
    the classifier: the feature path's tensors, by the registry model's names."""
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0] in FEATURE_PATH}


GRID_TITLES = ("input", "masked input", "reconstruction", "visible pasted back")
SHORT_GRID_TITLES = ("input", "masked", "recon.", "pasted")   # for columns under ~120 px


def reconstruction_grid(shown: SparkReconstruction, mean: Sequence[float] = transforms.IMAGENET_MEAN,
                        std: Sequence[float] = transforms.IMAGENET_STD, pad: int = 2) -> Image.Image:
    """An RGB image with one row per input image and the columns of GRID_TITLES (input | masked
    input | reconstruction | reconstruction with the visible patches pasted back), under a line of
    titles; the tensors are denormalised with mean/std. Cells are separated by `pad` white pixels."""
    columns = [shown.images, shown.masked, shown.reconstruction, shown.composite]
    cells = [(transforms.denormalise(c.detach().float().cpu(), mean, std) * 255).round().to(torch.uint8)
             for c in columns]
    b, _, height, width = cells[0].shape
    grid = Image.new("RGB", (4 * width + 5 * pad, TITLE_HEIGHT + b * height + (b + 1) * pad), "white")
    draw = ImageDraw.Draw(grid)
    # PIL's default font is about 6 px a character.
    titles = GRID_TITLES if max(len(t) for t in GRID_TITLES) * 6 <= width else SHORT_GRID_TITLES
    for col, (title, cell) in enumerate(zip(titles, cells)):
        x = pad + col * (width + pad)
        draw.text((x + 1, 1), title, fill="black")
        for row in range(b):
            tile = Image.fromarray(cell[row].permute(1, 2, 0).numpy())
            grid.paste(tile, (x, TITLE_HEIGHT + pad + row * (height + pad)))
    return grid


def build_spark_model(name: str, mask_ratio: float = DEFAULT_MASK_RATIO,
                      decoder_width: int = DEFAULT_DECODER_WIDTH, num_classes: int = 1000,
                      **build_kwargs: Any) -> SparkModel:
    """SparkModel around models.build_model(name, num_classes, **build_kwargs) (pretrained=...,
    verbose=..., TwistNet hyper-parameters); an unsupported name is a ModelConfigError."""
    check_spark_model(name)
    return SparkModel(models.build_model(name, num_classes, **build_kwargs), mask_ratio, decoder_width)


# --------------------------------------------------------------------------------------------
# Whole-image checks: BatchNorm statistics, feature rank, linear probe
# --------------------------------------------------------------------------------------------
# How many whole images pretrain_spark.py re-estimates the exported BatchNorm statistics on, and
# measures the feature ranks on. A few hundred images give each channel's mean and variance from
# millions of positions in the early layers and ~12k (256 x 7 x 7 at 224 px) in layer4.
DEFAULT_BN_IMAGES = 256
DEFAULT_RANK_IMAGES = 256
RANK_STAGES = ("layer3", "layer4")
# Images per forward pass of these checks (eval mode, no gradients), whatever the training batch:
# BatchNorm re-estimation averages per-batch statistics, so larger batches are closer to the
# statistics of the whole set.
CHECK_BATCH = 64


def effective_rank(features: torch.Tensor) -> float:
    """The effective rank of [N, C] features (Roy & Vetterli, 2007): exp of the entropy of the
    singular values of the centred features, normalised to sum 1. It lies between 1 (one
    direction carries everything) and min(N - 1, C) (all directions equally); 0 for constant
    features. Computed in float64."""
    x = features.detach().to(torch.float64)
    singular = torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))
    total = singular.sum()
    if not total > 0:
        return 0.0
    p = singular / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def pooled_stage_features(model: nn.Module, images: torch.Tensor, stages: Sequence[str] = RANK_STAGES,
                          batch_size: int = CHECK_BATCH) -> dict[str, torch.Tensor]:
    """{stage: [N, C] globally average-pooled output} of a registry model in eval mode, on the CPU
    in float32. `images` may sit on the CPU; each batch is moved to the model's device."""
    device = next(model.parameters()).device
    modules = {name: getattr(model, name) for name in stages}
    pooled: dict[str, list[torch.Tensor]] = {name: [] for name in stages}
    with model_tools.evaluating(model):
        for batch in images.split(batch_size):
            with model_tools.capture(modules) as outputs:
                model.forward_features(batch.to(device))
            for name in stages:
                pooled[name].append(outputs[name].float().mean(dim=(2, 3)).cpu())
    return {name: torch.cat(parts) for name, parts in pooled.items()}


@torch.no_grad()
def reestimate_batch_norm(model: nn.Module, images: torch.Tensor, batch_size: int = CHECK_BATCH) -> None:
    """Replace the running statistics of every BatchNorm of `model` by those of `images`, whole
    (no mask): the cumulative average over batches of each batch's mean and unbiased variance
    (torch.optim.swa_utils.update_bn's rule). Only the BatchNorms run in train mode, so
    stochastic depth stays off. SparK's running statistics describe the visible islands of masked
    images; a model fine-tuned or evaluated on whole images needs these instead."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    device = next(model.parameters()).device
    with model_tools.evaluating(model):
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        try:
            for batch in images.split(batch_size):
                model.forward_features(batch.to(device))
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum


def whole_image_copy(model: nn.Module, images: torch.Tensor, batch_size: int = CHECK_BATCH) -> nn.Module:
    """A copy of `model` in eval mode whose BatchNorm statistics are re-estimated on `images`."""
    duplicate = copy.deepcopy(model)
    reestimate_batch_norm(duplicate, images, batch_size)
    return duplicate.eval()


def feature_ranks(model: nn.Module, images: torch.Tensor, batch_size: int = CHECK_BATCH) -> dict[str, float]:
    """{stage: effective rank} of layer3's and layer4's pooled features on whole `images`, with
    the BatchNorm statistics re-estimated on them (the model itself is left unchanged)."""
    features = pooled_stage_features(whole_image_copy(model, images, batch_size), images, RANK_STAGES, batch_size)
    return {name: effective_rank(f) for name, f in features.items()}


def linear_probe_accuracy(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Validation accuracy (%) of scikit-learn's LogisticRegression (L2, C = 1) on standardised
    frozen features: train and val are (features [N, C], labels [N])."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train[0].numpy())
    classifier = LogisticRegression(max_iter=2000).fit(scaler.transform(train[0].numpy()), train[1].numpy())
    return 100.0 * float(classifier.score(scaler.transform(val[0].numpy()), val[1].numpy()))
