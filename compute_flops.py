"""Parameters, FLOPs and training/inference throughput of the registry models.

FLOPs are multiply-adds counted by fvcore (one fused multiply-add = one flop) on a single
3 x img_size x img_size image in eval mode. fvcore skips elementwise ops by default; STCI is
made of them (the z_i * t_j products, the L2 normalisation, the AIS re-weighting, the gate), so
the counter (model_tools.count_flops, which train.py also uses for results.json) also counts elementwise
products, divisions, rsqrt and the gated multiply-add, and sums, L2 norms and means, at one op per
element, and attention matmuls. Ops still left uncounted
are listed for every model.

Usage:
    python compute_flops.py                                  # table of every registry model
    python compute_flops.py --model twistnet18               # one model + per-part breakdown
    python compute_flops.py --models resnet18,twistnet18,swin_tiny --num_classes 102
    python compute_flops.py --latex > table.tex              # booktabs table
    python compute_flops.py --json --model twistnet18        # machine-readable
    python compute_flops.py --speed                          # img/s, resnet18 vs twistnet18
    python compute_flops.py --speed --device cuda --amp bf16 --channels_last on --compile --batch_size 128
    python compute_flops.py --speed --models resnet18,twistnet18 --device cpu --batch_size 16
    python compute_flops.py --checkpoint runs/x/pruned.pt [--speed]   # a pruned (or trained) model
                                                                        # beside its unpruned registry model

From Python:
    from helpers.model_tools import count_flops
    count_flops(model).total / 1e9     # GFLOPs (multiply-adds)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from helpers import model_tools, utils
from helpers.model_tools import FlopReport, count_flops
from helpers.utils import UserError

REFERENCE = "resnet18"
FLOP_UNIT = "GFLOPs (multiply-adds, fvcore convention)"
DEFAULT_SPEED_MODELS = ("resnet18", "twistnet18")
PART_STEM = "stem+layer1+layer2"
PART_BACKBONE = "layer3+layer4 backbone"
PART_STCI = "STCI modules"
PART_FC = "classifier (fc)"
PART_TOP = "top-level ops (global pool)"


# --------------------------------------------------------------------------------------------
# TwistNet per-part breakdown
# --------------------------------------------------------------------------------------------
@dataclass
class Part:
    name: str
    params: int
    flops: int


def param_part(name: str) -> str:
    """Which breakdown part a TwistNet parameter belongs to."""
    # STCI first: a sweep may put STCI into layer1/layer2, and it must still count as STCI.
    if ".stci." in name or name.endswith(".gate"):
        return PART_STCI
    if name.startswith(("conv1.", "bn1.", "layer1.", "layer2.")):
        return PART_STEM
    if name.startswith(("layer3.", "layer4.")):
        return PART_BACKBONE
    if name.startswith("fc."):
        return PART_FC
    raise ValueError(f"parameter '{name}' belongs to no TwistNet part")


def _own_ops(report: FlopReport, module: nn.Module, name: str) -> Counter:
    """Ops a module runs in its own forward, not inside one of its children."""
    own = Counter(report.by_module_operator.get(name, {}))
    for child, _ in module.named_children():
        own.subtract(report.by_module_operator.get(f"{name}.{child}", {}))
    return own


def stci_flops_by_block(model: models.TwistNet, report: FlopReport) -> dict[str, int]:
    """FLOPs of each block's STCI branch: the STCI module plus the gate product in the block."""
    result = {}
    for name, block in model.twist_blocks().items():
        # The gate product is the only multiplication a TwistBlock's own forward performs.
        gate = max(_own_ops(report, block, name).get("mul", 0), 0)
        result[name] = report.by_module.get(f"{name}.stci", 0) + gate
    return result


def twistnet_breakdown(model: models.TwistNet, report: FlopReport) -> list[Part]:
    """Params and FLOPs of stem+layer1+layer2, layer3+layer4, STCI, classifier, top-level ops."""
    params = Counter()
    for name, p in model.named_parameters():
        params[param_part(name)] += p.numel()
    stci = stci_flops_by_block(model, report)

    def stage_flops(stage: str) -> int:
        inside = sum(f for block, f in stci.items() if block.startswith(stage + "."))
        return report.by_module.get(stage, 0) - inside

    flops = {
        PART_STEM: sum(report.by_module.get(m, 0) for m in ("conv1", "bn1", "maxpool"))
        + stage_flops("layer1") + stage_flops("layer2"),
        PART_BACKBONE: stage_flops("layer3") + stage_flops("layer4"),
        PART_STCI: sum(stci.values()),
        PART_FC: report.by_module.get("fc", 0),
    }
    # Whatever the model's own forward does (global pooling) keeps the FLOP parts summing up.
    flops[PART_TOP] = report.total - sum(flops.values())
    order = (PART_STEM, PART_BACKBONE, PART_STCI, PART_FC, PART_TOP)
    return [Part(p, params.get(p, 0), flops[p]) for p in order]


def format_breakdown(name: str, parts: list[Part], report: FlopReport, n_blocks: int) -> str:
    total_params = sum(p.params for p in parts)
    lines = [f"{name}: parameters and FLOPs by part (MFLOPs = 1e6 multiply-adds, "
             f"{report.img_size}x{report.img_size})",
             f"  {'part':30s} {'params':>12s} {'share':>8s} {'MFLOPs':>10s} {'share':>8s}"]
    for p in parts + [Part("total", total_params, report.total)]:
        label = f"{p.name} ({n_blocks} blocks)" if p.name == PART_STCI else p.name
        lines.append(f"  {label:30s} {p.params:12,d} {_pct(p.params, total_params):>8s} "
                     f"{p.flops / 1e6:10.2f} {_pct(p.flops, report.total):>8s}")
    stci = next(p for p in parts if p.name == PART_STCI)
    lines.append(f"  STCI modules: {stci.params:,d} params ({100 * stci.params / total_params:.2f}% "
                 f"of total), {stci.flops / 1e6:.2f} MFLOPs "
                 f"({100 * stci.flops / report.total:.2f}% of total)")
    return "\n".join(lines)


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


# --------------------------------------------------------------------------------------------
# Model table
# --------------------------------------------------------------------------------------------
@dataclass
class ModelRow:
    name: str
    params: int
    venue: str
    group: str
    report: FlopReport | None = field(default=None, repr=False)
    breakdown: list[Part] | None = None
    error: str | None = None
    stci_blocks: int = 0

    @property
    def flops(self) -> int | None:
        return self.report.total if self.report is not None else None

    @property
    def uncounted(self) -> dict[str, int]:
        return self.report.uncounted if self.report is not None else {}


def measure_model(name: str, num_classes: int, img_size: int, model: nn.Module | None = None,
                  label: str | None = None) -> ModelRow:
    """The row of registry model `name`, or of `model` (a loaded checkpoint of it) shown as `label`."""
    spec = models.get_spec(name)
    model = model if model is not None else models.build_model(name, num_classes, pretrained=False, verbose=False)
    row = ModelRow(label or name, models.count_params(model), spec.venue, spec.group)
    try:
        report = count_flops(model, img_size)
    except Exception as exc:  # a timm model fvcore cannot trace must not sink the whole table
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return row
    row.report = report
    if isinstance(model, models.TwistNet):
        row.breakdown = twistnet_breakdown(model, report)
        row.stci_blocks = len(model.twist_blocks())
    return row


def _overhead(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{100 * (value - reference) / reference:+.2f}%"


def format_table(rows: list[ModelRow], reference: ModelRow, num_classes: int, img_size: int) -> str:
    lines = [f"Model complexity: {num_classes} classes, one {img_size}x{img_size} image, "
             f"{FLOP_UNIT}.",
             "Products, divisions, rsqrt, addcmul, sums, L2 norms and means count one op per element; "
             "overheads are relative to resnet18.",
             "",
             f"{'model':24s} {'params (M)':>10s} {'GFLOPs':>8s}  {'venue':10s} {'group':9s} "
             f"{'params vs R18':>13s} {'FLOPs vs R18':>13s}"]
    for r in rows:
        gf = f"{r.flops / 1e9:.3f}" if r.flops is not None else "failed"
        lines.append(f"{r.name:24s} {r.params / 1e6:10.2f} {gf:>8s}  {r.venue:10s} {r.group:9s} "
                     f"{_overhead(r.params, reference.params):>13s} "
                     f"{_overhead(r.flops, reference.flops):>13s}")
    lines += ["", "Not counted (ops with no FLOP handle; fvcore also ignores relu, cat, reshape...):"]
    for r in rows:
        note = f"FLOP count failed: {r.error}" if r.error else r.report.uncounted_text()
        lines.append(f"  {r.name}: {note}")
    return "\n".join(lines)


def format_latex(rows: list[ModelRow], num_classes: int, img_size: int) -> str:
    lines = [r"\begin{table}[t]", r"\centering",
             rf"\caption{{Model complexity ({num_classes} classes, {img_size}$\times${img_size} input; "
             r"GFLOPs are multiply-adds).}",
             r"\begin{tabular}{llrrl}", r"\toprule",
             r"Model & Venue & Params (M) & GFLOPs & Group \\", r"\midrule"]
    for r in rows:
        gf = f"{r.flops / 1e9:.2f}" if r.flops is not None else "--"
        lines.append(f"{utils.tex_escape(r.name)} & {utils.tex_escape(r.venue)} & {r.params / 1e6:.2f} & {gf} & {utils.tex_escape(r.group)} \\\\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def rows_to_json(rows: list[ModelRow], num_classes: int, img_size: int) -> list[dict]:
    out = []
    for r in rows:
        entry = dict(name=r.name, params=r.params, flops=r.flops, venue=r.venue, group=r.group,
                     num_classes=num_classes, img_size=img_size, uncounted_ops=r.uncounted)
        if r.error:
            entry["error"] = r.error
        if r.breakdown is not None:
            total = sum(p.params for p in r.breakdown)
            entry["breakdown"] = [dict(part=p.name, params=p.params, flops=p.flops,
                                       params_share=p.params / total, flops_share=p.flops / r.flops)
                                  for p in r.breakdown]
        out.append(entry)
    return out


def run_table(names: list[str], args: argparse.Namespace, loaded: dict[str, tuple[str, nn.Module]]) -> int:
    rows = [measure_model(n, args.num_classes, args.img_size) for n in names]
    rows += [measure_model(name, args.num_classes, args.img_size, model, label)
             for label, (name, model) in loaded.items()]
    if args.json:
        print(json.dumps(rows_to_json(rows, args.num_classes, args.img_size), indent=2))
    elif args.latex:
        print(format_latex(rows, args.num_classes, args.img_size))
    else:
        # The overhead columns need resnet18 even when it is not among the models shown.
        reference = next((r for r in rows if r.name == REFERENCE), None)
        reference = reference or measure_model(REFERENCE, args.num_classes, args.img_size)
        print(format_table(rows, reference, args.num_classes, args.img_size))
        for r in rows:
            if r.breakdown is not None:
                print()
                print(format_breakdown(r.name, r.breakdown, r.report, r.stci_blocks))
    failed = [r.name for r in rows if r.error]
    if failed:
        print(f"FLOP counting failed for: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------
@dataclass
class SpeedResult:
    name: str
    train: list[float]  # images/s of each timed repeat
    infer: list[float]

    @property
    def train_median(self) -> float:
        return statistics.median(self.train)

    @property
    def infer_median(self) -> float:
        return statistics.median(self.infer)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU: {cpu}, {threads} torch thread{'s' if threads != 1 else ''}"


def _synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously; without this the clock would only time the launches.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    dtype: torch.dtype | None, device: torch.device) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def step() -> None:
        with utils.autocast(device, dtype):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
    return step


def make_infer_step(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None,
                    device: torch.device) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), utils.autocast(device, dtype):
            model(x)
    return step


def _timed(step: Callable[[], None], n: int, device: torch.device, tick: Callable[[], None]) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
        tick()
    _synchronize(device)
    return time.perf_counter() - start


def _run_phase(phase: str, steps: dict[str, Callable[[], None]], args: argparse.Namespace,
               device: torch.device) -> dict[str, list[float]]:
    total = len(steps) * (args.warmup + args.repeats * args.steps)
    rates: dict[str, list[float]] = {n: [] for n in steps}
    with utils.progress(total=total, desc=phase, unit="step") as bar:
        tick = lambda: bar.update(1)  # noqa: E731
        for name, step in steps.items():
            bar.set_postfix_str(f"{name} warm-up")
            _timed(step, args.warmup, device, tick)
        # Repeats alternate between models so that slow drifts (turbo, other load) hit all alike.
        for r in range(args.repeats):
            for name, step in steps.items():
                bar.set_postfix_str(f"{name} repeat {r + 1}/{args.repeats}")
                seconds = _timed(step, args.steps, device, tick)
                rates[name].append(args.batch_size * args.steps / seconds)
    return rates


def prepare_model(name: str, args: argparse.Namespace, device: torch.device, model: nn.Module | None = None
                  ) -> nn.Module:
    model = model if model is not None else models.build_model(name, args.num_classes, pretrained=False, verbose=False)
    model = model.to(device)
    if utils.resolve_channels_last(args.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if args.compile else model


def benchmark(names: list[str], args: argparse.Namespace, loaded: dict[str, tuple[str, nn.Module]]
              ) -> list[SpeedResult]:
    device = utils.resolve_device(args.device)
    dtype = utils.resolve_amp(args.amp, device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    channels_last = utils.resolve_channels_last(args.channels_last, device)
    # One batch for every step and model, so data generation is never part of the timing.
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    nets = {n: prepare_model(n, args, device) for n in names}
    nets.update({label: prepare_model(name, args, device, model) for label, (name, model) in loaded.items()})

    for net in nets.values():
        net.train()
    train = _run_phase("train", {n: make_train_step(m, x, y, dtype, device) for n, m in nets.items()},
                       args, device)
    for net in nets.values():
        net.eval()
    infer = _run_phase("infer", {n: make_infer_step(m, x, dtype, device) for n, m in nets.items()},
                       args, device)
    return [SpeedResult(n, train[n], infer[n]) for n in nets]


def speed_settings(args: argparse.Namespace, device: torch.device) -> str:
    channels_last = utils.resolve_channels_last(args.channels_last, device)
    return (f"device: {device_description(device)}\n"
            f"torch {torch.__version__} | batch {args.batch_size} | img {args.img_size} | "
            f"classes {args.num_classes} | amp {utils.amp_label(utils.resolve_amp(args.amp, device))} | "
            f"channels_last {'on' if channels_last else 'off'} | compile {'on' if args.compile else 'off'}\n"
            f"median images/s over {args.repeats} repeats of {args.steps} steps, "
            f"after {args.warmup} warm-up steps; train = forward + backward + SGD step")


def format_speed(results: list[SpeedResult], args: argparse.Namespace) -> str:
    ref = next(r for r in results if r.name == REFERENCE)
    lines = [speed_settings(args, utils.resolve_device(args.device)), "",
             f"{'model':24s} {'train img/s':>12s} {'(min-max)':>15s} {'vs R18':>7s}   "
             f"{'infer img/s':>12s} {'(min-max)':>15s} {'vs R18':>7s}"]
    for r in results:
        lines.append(
            f"{r.name:24s} {r.train_median:12.2f} {_span(r.train):>15s} "
            f"{r.train_median / ref.train_median:7.3f}   {r.infer_median:12.2f} "
            f"{_span(r.infer):>15s} {r.infer_median / ref.infer_median:7.3f}")
    return "\n".join(lines)


def _span(values: list[float]) -> str:
    return f"({min(values):.1f}-{max(values):.1f})"


def speed_to_json(results: list[SpeedResult], args: argparse.Namespace) -> list[dict]:
    ref = next(r for r in results if r.name == REFERENCE)
    device = utils.resolve_device(args.device)
    settings = dict(device=device_description(device), torch=torch.__version__,
                    batch_size=args.batch_size, img_size=args.img_size,
                    amp=utils.amp_label(utils.resolve_amp(args.amp, device)),
                    channels_last=utils.resolve_channels_last(args.channels_last, device), compile=args.compile,
                    warmup=args.warmup, repeats=args.repeats, steps=args.steps)
    return [dict(name=r.name, train_img_s=r.train_median, infer_img_s=r.infer_median,
                 train_ratio=r.train_median / ref.train_median,
                 infer_ratio=r.infer_median / ref.infer_median,
                 train_repeats=r.train, infer_repeats=r.infer, **settings) for r in results]


def run_speed(names: list[str], args: argparse.Namespace, loaded: dict[str, tuple[str, nn.Module]]) -> int:
    # The ratio to ResNet-18 is only meaningful when both are timed in the same run.
    names = [REFERENCE] + [n for n in names if n != REFERENCE]
    results = benchmark(names, args, loaded)
    if args.json:
        print(json.dumps(speed_to_json(results, args), indent=2))
    else:
        print(format_speed(results, args))
    return 0


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", default=argparse.SUPPRESS,
                       help="one registry model (default: every model; with --speed: "
                            f"{','.join(DEFAULT_SPEED_MODELS)})")
    which.add_argument("--models", default=argparse.SUPPRESS,
                       help="comma-separated registry models (same default as --model)")
    parser.add_argument("--num_classes", type=utils.positive_int, default=47,
                        help="classifier width (47 = DTD; with --checkpoint, the checkpoint's)")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="a train.py best.pt or a prune.py output (repeatable), measured beside its registry "
                             "model (the unpruned one)")
    parser.add_argument("--img_size", type=utils.positive_int, default=224, help="input height and width")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--latex", action="store_true", help="print a booktabs LaTeX table")
    out.add_argument("--json", action="store_true", help="print JSON to stdout")

    speed = parser.add_argument_group("throughput (--speed)")
    speed.add_argument("--speed", action="store_true",
                       help="measure train and inference images/s instead of counting FLOPs")
    utils.add_device_arguments(speed)
    speed.add_argument("--batch_size", type=utils.positive_int, default=32, help="images per step")
    speed.add_argument("--compile", action="store_true", help="torch.compile the models")
    speed.add_argument("--warmup", type=utils.non_negative_int, default=3, help="untimed steps per model")
    speed.add_argument("--repeats", type=utils.positive_int, default=5, help="timed repeats (median reported)")
    speed.add_argument("--steps", type=utils.positive_int, default=5, help="steps per timed repeat")
    speed.add_argument("--seed", type=int, default=0, help="seed for weights and the random batch")
    speed.add_argument("--threads", type=utils.positive_int, default=torch.get_num_threads(),
                       help="CPU threads for torch (torch's own choice on this machine)")
    return parser


def selected_names(args: argparse.Namespace) -> list[str]:
    """Registry names asked for; models.get_spec raises a ModelConfigError for an unknown one."""
    if hasattr(args, "model"):
        names = [args.model]
    elif hasattr(args, "models"):
        names = [n.strip() for n in args.models.split(",") if n.strip()]
    else:
        names = list(DEFAULT_SPEED_MODELS) if args.speed else models.model_names()
    for n in names:
        models.get_spec(n)
    return list(dict.fromkeys(names))


def load_checkpoints(paths: Sequence[str]) -> dict[str, tuple[str, nn.Module]]:
    """{path: (registry name, model)} of --checkpoint files (pruned ones rebuilt at their widths)."""
    loaded = {}
    for path in paths:
        model, config = model_tools.load_checkpoint_model(path)
        loaded[path] = (config.get("model", "twistnet18"), model)
    return loaded


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.speed and args.latex:
        parser.error("--latex formats the FLOP table; with --speed use the text or --json output")
    loaded = load_checkpoints(args.checkpoint)
    if loaded:
        sizes = {model_tools.classifier_size(model.state_dict()) for _, model in loaded.values()}
        if len(sizes) > 1:
            raise UserError(f"the --checkpoint files classify different numbers of classes ({sorted(sizes)}); "
                            f"measure them in separate commands.")
        args.num_classes = sizes.pop()
        if not hasattr(args, "model") and not hasattr(args, "models"):
            args.models = ",".join(dict.fromkeys(name for name, _ in loaded.values()))
    names = selected_names(args)
    if not names:
        raise UserError("no model names given")
    if args.speed:
        utils.resolve_device(args.device)
    return run_speed(names, args, loaded) if args.speed else run_table(names, args, loaded)


if __name__ == "__main__":
    sys.exit(utils.run_main(main))
