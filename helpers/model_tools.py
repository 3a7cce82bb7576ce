"""Working with a built model: looking inside it, slimming it, and loading a trained one.

Usage:
    from helpers import model_tools
    model, config = model_tools.load_checkpoint_model("runs/x/best.pt")  # also pruned files (prune.py)
    model_tools.gate_values(model)                 # {'layer3.0': 0.12, ...}
    model_tools.stci_internals(model, images)      # per-head interaction matrices, AIS weights, gates
    with model_tools.capture({"layer4": model.layer4}) as outputs:
        model(images)
    loss = loss + 1e-4 * model_tools.bn_l1_penalty(model)     # network slimming's sparsity term

models.py builds models (architecture, registry, pretrained weights); this module takes them as
they are, whatever built them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

import models
from models import ModelConfigError, TwistBlock, twist_blocks, unwrap_model


# --------------------------------------------------------------------------------------------
# Introspection
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block; its train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def capture(modules: Mapping[str, nn.Module], inputs: bool = False, detach: bool = True, clone: bool = False
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Record each named module's output (or first input) during the forward passes in the block.

    clone: keep a copy, which later in-place ops of the forward (ReLU, residual adds) cannot edit.
    """
    store: dict[str, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        value = value.detach() if detach else value
        store[name] = value.clone() if clone else value

    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: keep(name, args[0])) if inputs
               else m.register_forward_hook(lambda mod, args, out, name=name: keep(name, out))
               for name, m in modules.items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def submodules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Named sub-modules of the (unwrapped) model; an unknown name is a ModelConfigError."""
    found = dict(unwrap_model(model).named_modules())
    missing = [n for n in names if n not in found]
    if missing:
        raise ModelConfigError(f"No sub-module {', '.join(map(repr, missing))} in {type(unwrap_model(model)).__name__}")
    return {n: found[n] for n in names}


def gate_values(model: nn.Module) -> dict[str, float]:
    """sigmoid(gate) of every TwistBlock, by block name."""
    return {name: float(torch.sigmoid(m.gate.detach())) for name, m in twist_blocks(model).items()}


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled features the classifier reads (timm's pre-logits; TwistNet follows timm's API)."""
    inner = unwrap_model(model)
    return inner.forward_head(inner.forward_features(x), pre_logits=True)


def stci_param_count(model: nn.Module) -> int:
    """Parameters of the STCI branches and their gates (0 for models without STCI)."""
    return sum(p.numel() for name, p in unwrap_model(model).named_parameters()
               if ".stci." in f".{name}" or name.endswith(".gate"))


@torch.no_grad()
def stci_internals(model: nn.Module, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Per TwistBlock, for input batch x (the model is run in eval mode):

    - 'interaction': [heads, r, r] mean over batch and space of z_norm[i] * t_norm[j]
    - 'ais': [heads, r + r(r+1)/2] mean AIS weight per channel (absent without AIS)
    - 'gate': sigmoid(gate)
    """
    blocks = twist_blocks(model)
    with evaluating(model), capture({n: b.stci for n, b in blocks.items()}, inputs=True) as inputs:
        model(x)
        return {name: _internals_of(blk, inputs[name]) for name, blk in blocks.items()}


def _internals_of(blk: TwistBlock, block_input: torch.Tensor) -> dict[str, torch.Tensor]:
    """Interaction matrix, AIS weights and gate of one TwistBlock's STCI (model in eval mode)."""
    stci = blk.stci
    z, t = stci.reduced(block_input)
    inter = torch.einsum("bdihw,bdjhw->bdij", z, t) / (z.shape[-1] * z.shape[-2])
    entry = {"interaction": inter.mean(0).cpu(), "gate": torch.sigmoid(blk.gate).cpu()}
    weights = stci.ais_weights(stci.interactions(block_input))
    if weights is not None:
        entry["ais"] = weights.mean(0).view(stci.heads, stci.head_channels).cpu()
    return entry


@torch.no_grad()
def feature_maps(model: nn.Module, x: torch.Tensor,
                 layers: Iterable[str] = ("layer1", "layer2", "layer3", "layer4")) -> dict[str, torch.Tensor]:
    """Output of each named sub-module for input x (eval mode)."""
    with evaluating(model), capture(submodules(model, tuple(layers))) as outputs:
        model(x)
    return outputs


# --------------------------------------------------------------------------------------------
# Network slimming (Liu et al., ICCV 2017): BN-scale sparsity, and pruned models rebuilt from
# their channel configuration (prune.py does the pruning itself, with torch-pruning)
# --------------------------------------------------------------------------------------------
_WIDTH_ATTRS = ((nn.Conv2d, ("in_channels", "out_channels", "groups")), (nn.Linear, ("in_features", "out_features")),
                (nn.modules.batchnorm._BatchNorm, ("num_features",)), (nn.GroupNorm, ("num_groups", "num_channels")))


def slimming_exempt(model: nn.Module) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """(modules whose output channels pruning keeps, parameters it leaves alone).

    The classifier keeps its classes. Inside STCI only the output projection (proj, proj_bn) is
    prunable, with the residual stream it is added to; the reduced width (r per head) feeds pairwise
    products, per-head normalisation and a GroupNorm over the interaction channels, so removing one
    reduced channel removes r + 1 features and changes the GroupNorm statistics of the rest.
    """
    model = unwrap_model(model)
    modules = [model.get_classifier()] if hasattr(model, "get_classifier") else []
    params: list[nn.Parameter] = []
    for block in twist_blocks(model).values():
        modules += [m for m in block.stci.modules() if m not in (block.stci, block.stci.proj, block.stci.proj_bn)]
        params += [p for p in (block.gate, block.stci.twist_scale) if p is not None]
    return modules, params


def slimming_bns(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """The BatchNorm2d layers whose scales rank prunable channels, by name (not STCI's reduce_bn)."""
    exempt = set(slimming_exempt(model)[0])
    return {n: m for n, m in unwrap_model(model).named_modules() if isinstance(m, nn.BatchNorm2d) and m not in exempt}


def bn_l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |BN scale| over slimming_bns: add sparsity_reg * this to the loss for sparsity training."""
    weights = [m.weight for m in slimming_bns(model).values() if m.weight is not None]
    if not weights:
        raise ModelConfigError(f"{type(unwrap_model(model)).__name__} has no BatchNorm2d scales to sparsify")
    return torch.stack([w.abs().sum() for w in weights]).sum()


@torch.no_grad()
def bn_sparsity(model: nn.Module, threshold: float = 1e-2) -> float:
    """Share of the slimming BN scales with |scale| < threshold."""
    weights = [m.weight.detach().abs().flatten() for m in slimming_bns(model).values() if m.weight is not None]
    return float((torch.cat(weights) < threshold).float().mean()) if weights else 0.0


def channel_config(model: nn.Module) -> dict[str, dict[str, int]]:
    """Width attributes of every Conv2d, Linear, BatchNorm and GroupNorm, by module name."""
    config = {}
    for name, module in unwrap_model(model).named_modules():
        attrs = next((a for kind, a in _WIDTH_ATTRS if isinstance(module, kind)), None)
        if attrs is not None:
            config[name] = {a: int(getattr(module, a)) for a in attrs}
    return config


def apply_channel_config(model: nn.Module, channels: Mapping[str, Mapping[str, int]],
                         state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Resize the named modules of a freshly built model to a pruned configuration, in place.

    Width attributes come from `channels`; every parameter and buffer of a resized module takes the
    shape its state_dict entry has (the values are loaded afterwards, strictly). Only ints and
    tensors are read, so a pruned checkpoint loads with torch.load(weights_only=True).
    """
    found = dict(unwrap_model(model).named_modules())
    for name, attrs in channels.items():
        module = found.get(name)
        allowed = next((a for kind, a in _WIDTH_ATTRS if isinstance(module, kind)), ()) if module else ()
        if not allowed or not set(attrs) <= set(allowed):
            raise ModelConfigError(f"Pruned channel configuration does not fit the model at '{name}': {dict(attrs)}")
        for attr, value in attrs.items():
            setattr(module, attr, int(value))
        for slots, make in ((module._parameters, nn.Parameter), (module._buffers, lambda t: t)):
            for key, tensor in slots.items():
                entry = state.get(f"{name}.{key}")
                if tensor is not None and entry is not None and entry.shape != tensor.shape:
                    slots[key] = make(tensor.new_empty(entry.shape))
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(getattr(model, "num_features", None), int) and isinstance(classifier, nn.Linear):
        model.num_features = classifier.in_features
    return model


# --------------------------------------------------------------------------------------------
# Trained checkpoints
# --------------------------------------------------------------------------------------------
def load_checkpoint_model(path: str | os.PathLike, weights: str = "auto", model: str | None = None,
                          model_flag: str | None = None) -> tuple[nn.Module, dict]:
    """(model in eval mode, its training config) from a train.py best.pt/last.pt or a plain state_dict.

    weights: 'auto' takes the EMA weights when the checkpoint has them (those are what train.py
    selected and tested), 'model' or 'ema' force one. A plain state_dict (no training config) is
    taken for `model`, default twistnet18. model_flag: the caller's option that names the model
    (e.g. '--model'), offered in the error when the weights fit another registry model.
    """
    return model_from_checkpoint(models.load_checkpoint_file(path), weights, label=str(path), model=model,
                                 model_flag=model_flag)


def model_kwargs_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The build_model keywords of a run's config: --model_kwargs plus the --drop_path, --blurpool
    and --stci_init flags (train.py, pretraining), so that every rebuild of a run builds its model."""
    kwargs = dict(config.get("model_kwargs") or {})
    stci_init = config.get("stci_init") or "default"
    if stci_init != "default" and models.is_twistnet(str(config.get("model", ""))):
        kwargs["stci_init"] = stci_init   # recipes.resolve_preset refuses a contradicting --model_kwargs
    flags = {"drop_path": config.get("drop_path") or 0.0, "blurpool": bool(config.get("blurpool"))}
    for key, value in flags.items():
        if value and key in kwargs and kwargs[key] != value:
            raise ModelConfigError(f"--{key} {value} and --model_kwargs {key}={kwargs[key]} disagree; give one.")
        if value:
            kwargs[key] = value
    return kwargs


def model_from_checkpoint(ckpt: Any, weights: str = "auto", label: str = "checkpoint", model: str | None = None,
                          model_flag: str | None = None) -> tuple[nn.Module, dict]:
    """load_checkpoint_model for an already loaded object; a pruned file (prune.py: its
    'pruned_channels') is rebuilt from the registry model resized to the stored widths."""
    config = dict(ckpt.get("config") or {}) if isinstance(ckpt, dict) else {}
    if model is not None:
        if config.get("model") not in (None, model):
            raise ModelConfigError(f"{label} was trained as {config['model']} (its config says so), not {model}: "
                                   f"drop {model_flag or 'the model name'} or name {config['model']}.")
        config.setdefault("model", model)
    has_ema = isinstance(ckpt, dict) and isinstance(ckpt.get("ema"), dict) and bool(ckpt["ema"])
    if weights == "ema" and not has_ema:
        raise ModelConfigError(f"{label} holds no EMA weights")
    source = ckpt["ema"] if (weights == "ema" or (weights == "auto" and has_ema)) else ckpt
    state = models.extract_state_dict(source)
    name = config.get("model", "twistnet18")
    model = models.build_model(name, classifier_size(state), pretrained=False, verbose=False,
                               **model_kwargs_of(config))
    if isinstance(ckpt, dict) and ckpt.get("pruned_channels"):
        apply_channel_config(model, ckpt["pruned_channels"], state)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise ModelConfigError(mismatch_message(label, name, state, "model" in config, model_flag)) from None
    return model.eval(), config


def mismatch_message(label: str, name: str, state: Mapping[str, Any], named: bool, model_flag: str | None) -> str:
    """Why `state` does not load into `name`, and which registry model it fits, if any."""
    assumed = "" if named else " (a plain state_dict, without a training config, is taken for twistnet18)"
    fits = [n for n in matching_registry_models(state) if n != name]
    if not fits:
        return (f"{label} does not fit {name}{assumed}, nor any registry model built with default settings: "
                f"its tensor names or shapes differ.")
    # A name from the file's own config cannot be overridden by the flag: then only say what it is.
    how = f"pass {model_flag} {fits[0]}" if model_flag and not named else f"load it as {fits[0]}"
    return f"{label} does not fit {name}{assumed}: its weights are those of {' / '.join(fits)}; {how}."


def matching_registry_models(state: Mapping[str, Any]) -> list[str]:
    """Registry models whose state_dict has exactly the names and shapes of `state` (the class
    count taken from its classifier), default settings; built on the meta device (no memory).
    The timm baselines come first: a ResNet-18 file also fits twistnet18_first_order (no STCI)."""
    try:
        num_classes = classifier_size(state)
    except ModelConfigError:
        return []
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    found = []
    for name in sorted(models.MODEL_SPECS, key=lambda n: models.MODEL_SPECS[n].is_twistnet):
        try:
            with torch.device("meta"):
                candidate = models.build_model(name, num_classes, verbose=False).state_dict()
        except Exception:   # a model that cannot be built on the meta device is simply not offered
            continue
        if {k: tuple(v.shape) for k, v in candidate.items()} == shapes:
            found.append(name)
    return found


def load_pruned(path: str | os.PathLike, config: Mapping[str, Any], num_classes: int) -> tuple[nn.Module, dict]:
    """(model, pruning facts) of a prune.py output, rebuilt for fine-tuning under a run's `config`
    (train.py --refine). The run must name the pruned model and its architecture (--model,
    --model_kwargs, --blurpool); --drop_path may differ, it holds no weights."""
    ckpt = models.load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or not ckpt.get("pruned_channels") or not isinstance(ckpt.get("pruning"), dict):
        raise ModelConfigError(f"{path} is not a prune.py output (it has no pruned channel configuration); "
                               f"--refine takes the file prune.py writes.")
    source = dict(ckpt.get("config") or {})
    source.setdefault("model", "twistnet18")

    def architecture(c: Mapping[str, Any]) -> tuple:
        return c.get("model"), sorted((k, v) for k, v in model_kwargs_of(c).items() if k != "drop_path")
    if architecture(source) != architecture(config):
        kwargs = dict(architecture(source)[1])
        raise ModelConfigError(f"{path} holds a pruned {source['model']} built with {kwargs or 'default settings'}; "
                               f"refine it with --model {source['model']} and the same --model_kwargs/--blurpool.")
    size = classifier_size(models.extract_state_dict(ckpt))
    if size != num_classes:
        raise ModelConfigError(f"{path} classifies {size} classes, the dataset has {num_classes}; refine it on the "
                               f"dataset it was trained on.")
    model, _ = model_from_checkpoint({"model": ckpt["model"], "config": dict(config),
                                      "pruned_channels": ckpt["pruned_channels"]}, "model", label=str(path))
    return model.train(), {"pruned_channels": ckpt["pruned_channels"], **ckpt["pruning"]}


def classifier_size(state: Mapping[str, Any]) -> int:
    """Number of classes: rows of the classifier weight (fc, or timm's last 2-D weight)."""
    if "fc.weight" in state:
        return int(state["fc.weight"].shape[0])
    matrices = [k for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not matrices:
        raise ModelConfigError("No classifier weight found in the checkpoint")
    return int(state[matrices[-1]].shape[0])


# --------------------------------------------------------------------------------------------
# FLOPs (fvcore), counted the same way for results.json, compute_flops.py and prune.py
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FlopReport:
    """Result of count_flops; `total` is in multiply-adds (fvcore convention)."""
    total: int
    by_module: dict[str, int]
    by_module_operator: dict[str, dict[str, int]]
    uncounted: dict[str, int]  # op -> how many calls had no handle
    img_size: int = 224

    def uncounted_text(self) -> str:
        if not self.uncounted:
            return "none"
        ops = sorted(self.uncounted.items(), key=lambda kv: (-kv[1], kv[0]))
        return ", ".join(f"{op} (x{n})" for op, n in ops)


def _numel(shape: Sequence[int] | None) -> int:
    # fvcore hands over None for values whose shape the tracer did not record (scalars).
    return math.prod(shape) if shape else 0


def _per_output_element(inputs: list, outputs: list) -> int:
    from fvcore.nn.jit_handles import get_shape
    return _numel(get_shape(outputs[0]))


def _per_input_element(inputs: list, outputs: list) -> int:
    from fvcore.nn.jit_handles import get_shape
    return _numel(get_shape(inputs[0]))


def _attention_flops(inputs: list, outputs: list) -> int:
    # Fused attention hides two matmuls (q @ k^T and attn @ v) that fvcore counts when they are
    # written out; count them here so fused and unfused models compare fairly.
    from fvcore.nn.jit_handles import get_shape
    q, k, v = (get_shape(t) for t in inputs[:3])
    if not (q and k and v):
        return 0
    return _numel(q[:-1]) * k[-2] * (q[-1] + v[-1])


# fvcore skips elementwise ops, and STCI is made of them. Products, divisions, rsqrt and the gated
# add: one op per output element (z_i * t_j, squares for the L2 norm, AIS, gate). Reductions: one
# multiply-add per input element, as fvcore already does for adaptive_avg_pool2d.
EXTRA_FLOP_HANDLES: Mapping[str, Callable[[list, list], int]] = {
    "aten::mul": _per_output_element, "aten::mul_": _per_output_element,
    "aten::div": _per_output_element, "aten::div_": _per_output_element,
    "aten::addcmul": _per_output_element, "aten::addcmul_": _per_output_element,
    "aten::rsqrt": _per_output_element,
    "aten::linalg_vector_norm": _per_input_element, "aten::sum": _per_input_element,
    "aten::mean": _per_input_element,
    "aten::scaled_dot_product_attention": _attention_flops,
}


def count_flops(model: nn.Module, img_size: int = 224, extra_handles: bool = True) -> FlopReport:
    """FLOPs (multiply-adds) of `model` on one 3 x img_size x img_size image, in eval mode.

    extra_handles=False gives fvcore's plain count (elementwise ops skipped); the default also
    counts the ops of EXTRA_FLOP_HANDLES. The model's train/eval mode is restored afterwards.
    """
    with warnings.catch_warnings():  # fvcore's import torch.jit.scripts a loss, which torch flags
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis
    param = next(model.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    image = torch.randn(1, 3, img_size, img_size, device=device, dtype=dtype)
    # Tracing emits TracerWarnings and deprecation notices that say nothing about FLOPs.
    with evaluating(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = (FlopCountAnalysis(model, image).unsupported_ops_warnings(False)
                    .uncalled_modules_warnings(False).tracer_warnings("none"))
        if extra_handles:
            for op, handle in EXTRA_FLOP_HANDLES.items():
                analysis.set_op_handle(op, handle)
        return FlopReport(int(analysis.total()), {k: int(v) for k, v in analysis.by_module().items()},
                          {k: {op: int(n) for op, n in c.items()} for k, c in analysis.by_module_and_operator().items()},
                          dict(analysis.unsupported_ops()), img_size)
