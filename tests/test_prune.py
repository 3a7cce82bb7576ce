"""Tests for stochastic depth, anti-aliased downsampling and network slimming (models.py, prune.py).

Covered: drop_path is the identity in eval and drops whole residual branches per sample in train,
with timm's linear rate rule; blurpool keeps every state_dict key and shape (the ResNet-18
transfer summary is unchanged) and still gives [B, classes]; the BN-scale L1 penalty and sparsity
share; the surgery (zero the BN scale and shift of the channels to be removed, prune with
torch-pruning, logits unchanged to 1e-5) for twistnet18 and resnet18; pinned params / FLOPs at
30% and 50%; layer scope; never a zero-width layer; the pruned file round trip through
torch.load(weights_only=True); the prune.py CLI and its user errors.

Models are built at random init; their BatchNorm scales are set by a fixed formula (no RNG), as
if after sparsity training, so the pruning plans and the pinned numbers are exact.

    .venv/bin/python -m pytest -q tests/test_prune.py
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from helpers import model_tools
import prune
from helpers import utils

# Fixtures that take seconds (they train, prune or start processes): their tests are `slow` (tests/conftest.py).
SLOW_FIXTURES = ('pruned',)

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 47
# params / FLOPs at 224 px (fvcore multiply-adds + the elementwise ops model_tools.count_flops adds) of
# the unpruned models and after global pruning of 30% / 50% with spread_bn_scales. Params follow
# exactly from the plan (which depends only on the BN scales); FLOPs get 0.5% for fvcore changes.
PINNED = {
    ("twistnet18", 0.0): (11_588_963, 1_851_361_680),
    ("twistnet18", 0.3): (6_553_747, 996_525_057),
    ("twistnet18", 0.5): (3_034_311, 505_362_815),
    ("resnet18", 0.0): (11_200_623, 1_818_577_920),
    ("resnet18", 0.3): (5_855_280, 1_023_535_531),
    ("resnet18", 0.5): (2_822_336, 489_463_912),
}


def spread_bn_scales(model: nn.Module) -> nn.Module:
    """Distinct BN scales in [0, 1), shifts and running statistics, by formula (no RNG)."""
    with torch.no_grad():
        for k, bn in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            c = torch.arange(bn.num_features, dtype=torch.float32)
            bn.weight.copy_(torch.frac((c + 1) * 0.6180339887 + k * 0.37))
            bn.bias.copy_(0.1 * torch.sin(c + k))
            bn.running_mean.copy_(0.1 * torch.cos(0.7 * c + k))
            bn.running_var.copy_(1 + 0.5 * torch.sin(1.3 * c + k))
    return model


def slimmed_model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return spread_bn_scales(models.build_model(name, NUM_CLASSES, verbose=False, **kwargs)).eval()


def images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def conv_linear_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


# --------------------------------------------------------------------------------------------
# drop_path
# --------------------------------------------------------------------------------------------
def test_drop_path_rates_follow_timms_linear_rule():
    ours = models.build_model("twistnet18", 5, verbose=False, drop_path=0.35)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in ours.modules() if isinstance(b, models.TwistBlock)]
    assert rates == pytest.approx([0.35 * k / 7 for k in range(8)])
    assert isinstance(ours.layer1[0].drop_path, nn.Identity)
    theirs = models.build_model("resnet18", 5, verbose=False, drop_path=0.35)
    timm_rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in theirs.modules()
                  if isinstance(b, timm.models.resnet.BasicBlock)]
    assert timm_rates == pytest.approx(rates)


def test_drop_path_is_identity_in_eval_and_drops_whole_branches_per_sample_in_train():
    torch.manual_seed(0)
    with_dp = models.build_model("twistnet18", 5, verbose=False, drop_path=0.5)
    without = models.build_model("twistnet18", 5, verbose=False)
    without.load_state_dict(with_dp.state_dict())
    x = images(4)
    with torch.no_grad():
        assert torch.equal(with_dp.eval()(x), without.eval()(x))

    block = with_dp.layer4[1]  # rate 0.5, identity shortcut, carries STCI
    assert block.stci is not None and block.downsample is None
    block.train()
    inputs = F.relu(torch.randn(16, 512, 2, 2, generator=torch.Generator().manual_seed(2)))
    torch.manual_seed(3)
    with torch.no_grad():
        out = block(inputs.clone())
    # A dropped sample's branch (convs + gated STCI) is absent: relu(0 + x) = x exactly.
    dropped = [torch.equal(out[i], inputs[i]) for i in range(16)]
    assert 0 < sum(dropped) < 16, dropped


# --------------------------------------------------------------------------------------------
# blurpool
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["twistnet18", "resnet18"])
def test_blurpool_keeps_every_key_shape_and_the_transfer_summary(name):
    torch.manual_seed(0)
    plain = models.build_model(name, 5, verbose=False)
    blurred = models.build_model(name, 5, verbose=False, blurpool=True)
    a, b = plain.state_dict(), blurred.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    source = timm.create_model("resnet18", pretrained=False).state_dict()
    assert (models.transfer_weights(plain, source).summary("t")
            == models.transfer_weights(blurred, source).summary("t"))
    # Anti-aliasing is really there: stride-1 conv then a blur, and a different function.
    assert blurred.layer2[0].conv1.stride == (1, 1) and type(blurred.layer2[0].aa).__name__ == "BlurPool2d"
    with torch.no_grad():
        for size in (32, 64):
            assert blurred.eval()(images(2, size)).shape == (2, 5)
        assert not torch.allclose(plain.eval()(images()), blurred(images()))


@pytest.mark.parametrize("name, kwargs", [("convnextv2_nano", {"blurpool": True}),
                                          ("repvit_m1_5", {"drop_path": 0.1})])
def test_baselines_without_the_option_give_a_clear_error(name, kwargs):
    with pytest.raises(models.ModelConfigError, match=name):
        models.build_model(name, 5, verbose=False, **kwargs)


# --------------------------------------------------------------------------------------------
# Sparsity helpers
# --------------------------------------------------------------------------------------------
def test_slimming_bns_penalty_and_sparsity_share():
    model = slimmed_model("twistnet18")
    bns = model_tools.slimming_bns(model)
    all_bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert "layer3.0.stci.proj_bn" in bns and "layer3.0.stci.reduce_bn" not in bns
    assert len(bns) == len(all_bns) - 4
    with torch.no_grad():
        model.bn1.weight[:10] = -0.5  # the penalty is on |scale|
    penalty = model_tools.bn_l1_penalty(model)
    assert penalty.detach().item() == pytest.approx(sum(float(m.weight.detach().abs().sum()) for m in bns.values()), rel=1e-6)
    penalty.backward()
    assert torch.equal(model.bn1.weight.grad, torch.sign(model.bn1.weight.detach()))
    assert model.layer3[0].stci.reduce_bn.weight.grad is None

    scales = torch.cat([m.weight.detach().abs() for m in bns.values()])
    for threshold in (1e-2, 0.25):
        assert model_tools.bn_sparsity(model, threshold) == pytest.approx(float((scales < threshold).float().mean()))
    assert len(model_tools.slimming_bns(models.build_model("resnet18", 5, verbose=False))) == 20
    with pytest.raises(models.ModelConfigError, match="BatchNorm2d"):
        model_tools.bn_l1_penalty(models.build_model("convnextv2_nano", 5, verbose=False))


# --------------------------------------------------------------------------------------------
# Surgery
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pruned() -> dict:
    """(name, percent) -> record of a global BN-scale pruning: the model, logits, params, FLOPs."""
    records = {}
    for name in ("twistnet18", "resnet18"):
        unpruned = slimmed_model(name)
        start = {"params0": models.count_params(unpruned), "flops0": model_tools.count_flops(unpruned, 224).total,
                 "widths0": conv_linear_widths(unpruned)}
        for percent in (0.3, 0.5):
            model, record = slimmed_model(name), dict(start)
            with torch.no_grad():
                record["unmasked"] = model(images())
            plan = prune.plan_pruning(model, percent, "global")
            prune.mask_planned_channels(plan)
            with torch.no_grad():
                record["masked"] = model(images())
                prune.apply_plan(plan)
                record["pruned"] = model(images())
            record.update(model=model, params=models.count_params(model), flops=model_tools.count_flops(model, 224).total)
            records[name, percent] = record
    return records


@pytest.mark.parametrize("name", ["twistnet18", "resnet18"])
@pytest.mark.parametrize("percent", [0.3, 0.5])
def test_pruning_gives_the_masked_models_logits(pruned, name, percent):
    r = pruned[name, percent]
    assert (r["pruned"] - r["masked"]).abs().max() < 1e-5
    assert (r["masked"] - r["unmasked"]).abs().max() > 1e-3  # the mask did remove something


@pytest.mark.parametrize("name", ["twistnet18", "resnet18"])
@pytest.mark.parametrize("percent", [0.3, 0.5])
def test_pruned_params_and_flops_are_pinned(pruned, name, percent):
    r = pruned[name, percent]
    assert (r["params0"], r["flops0"]) == (PINNED[name, 0.0][0], pytest.approx(PINNED[name, 0.0][1], rel=5e-3))
    assert r["params"] == PINNED[name, percent][0]
    assert r["flops"] == pytest.approx(PINNED[name, percent][1], rel=5e-3)
    assert r["params"] < r["params0"] and r["flops"] < r["flops0"]


def test_stci_keeps_its_width_and_follows_h_and_the_residual_stream(pruned):
    model, before = pruned["twistnet18", 0.5]["model"], pruned["twistnet18", 0.5]["widths0"]
    for name in models.twist_blocks(model):
        block = model.get_submodule(name)
        stci = block.stci
        assert stci.reduce.in_channels == block.conv1.out_channels == block.conv2.in_channels
        assert stci.reduce.in_channels < before[f"{name}.stci.reduce"][0]
        assert stci.reduce.out_channels == 32 and stci.proj.in_channels == 176  # r = 8 per head, kept
        assert stci.proj.out_channels == block.conv2.out_channels == stci.proj_bn.num_features
    assert model.layer4[0].conv2.out_channels < 512


@pytest.mark.parametrize("name", ["twistnet18_no_spiral", "twistnet18_no_ais", "seresnet18"])
def test_surgery_on_the_other_prunable_models(name):
    model = slimmed_model(name)
    params = models.count_params(model)
    plan = prune.plan_pruning(model, 0.4, "global")
    assert prune.prune_checked(model, plan) < 1e-5
    assert models.count_params(model) < 0.75 * params


def test_layer_scope_prunes_every_group_by_the_same_share():
    model = slimmed_model("twistnet18_first_order")
    plan = prune.plan_pruning(model, 0.5, "layer")
    prune.apply_plan(plan)
    widths = conv_linear_widths(model)
    assert widths["conv1"][1] == 32 and widths["layer3.1.conv1"][1] == 128 and widths["layer4.0.conv2"][1] == 256
    assert widths["fc"] == (256, NUM_CLASSES)


@pytest.mark.parametrize("name, scope, kept", [("twistnet18", "global", 1), ("resnet18", "layer", 128 - int(128 * 0.99))])
def test_never_a_layer_with_zero_channels(name, scope, kept):
    model = slimmed_model(name, blurpool=True)
    with torch.no_grad():  # a whole residual stream "switched off" by sparsity training
        for m in (model.layer2[0].bn2, model.layer2[0].downsample[1], model.layer2[1].bn2):
            m.weight.fill_(1e-4)
    prune.prune_checked(model, prune.plan_pruning(model, 0.99, scope, min_keep=0.0))
    widths = conv_linear_widths(model)
    assert min(min(w) for w in widths.values()) >= 1
    assert widths["layer2.0.conv2"][1] == kept
    with torch.no_grad():
        assert model(images(1)).shape == (1, NUM_CLASSES)


# --------------------------------------------------------------------------------------------
# The pruned file
# --------------------------------------------------------------------------------------------
def test_pruned_file_round_trips_with_weights_only(pruned, tmp_path):
    for name in ("twistnet18", "resnet18"):
        model = pruned[name, 0.5]["model"]
        fresh = model_tools.channel_config(models.build_model(name, NUM_CLASSES, verbose=False))
        ckpt = prune.pruned_checkpoint(model, fresh, {"model": name, "model_kwargs": {}}, {"percent": 0.5})
        path = tmp_path / f"{name}.pt"
        utils.atomic_save(ckpt, path)
        loaded = torch.load(path, weights_only=True)
        assert set(loaded["pruned_channels"]) <= set(fresh)  # only the resized layers are stored
        assert not [k for k in loaded["pruned_channels"] if k.endswith(("stci.twist", "stci.norm", "stci.ais.0"))]
        rebuilt, config = model_tools.model_from_checkpoint(loaded)
        assert config["model"] == name and models.count_params(rebuilt) == pruned[name, 0.5]["params"]
        with torch.no_grad():
            assert torch.equal(rebuilt(images()), model(images()))
        from_file, _ = model_tools.load_checkpoint_model(path)
        assert conv_linear_widths(from_file) == conv_linear_widths(model)
    with pytest.raises(models.ModelConfigError, match="pruned"):
        models.build_model("resnet18", NUM_CLASSES, pretrained=str(path), verbose=False)


def sparsify(model: nn.Module, share: float) -> nn.Module:
    """As if after sparsity training: the first `share` of every slimming BatchNorm's channels
    get |scale| 1e-3 (the same indices in every BatchNorm, so a residual stream's group score too),
    the others at least 0.05."""
    with torch.no_grad():
        for bn in model_tools.slimming_bns(model).values():
            bn.weight.clamp_(min=0.05)
            bn.weight[:int(share * bn.num_features)] = 1e-3
    return model


def unsparsified(name: str = "resnet18") -> nn.Module:
    """BN scales as after training without --sparsity_reg (none near 0), layer4's inner widths
    the least important: the global threshold at 0.4 would take nearly all of them."""
    model = slimmed_model(name)
    with torch.no_grad():
        for bn in model_tools.slimming_bns(model).values():
            bn.weight.mul_(0.5).add_(0.5)                 # [0.5, 1)
        for block in model.layer4:
            block.bn1.weight.mul_(0.1)                     # [0.05, 0.1)
    return model


def train_checkpoint(path: Path, name: str = "twistnet18", sparse_share: float = 0.0, **model_kwargs) -> Path:
    """A dict shaped like train.py's best.pt (sparse_share > 0: as after sparsity training)."""
    model = slimmed_model(name, **model_kwargs)
    if sparse_share:
        sparsify(model, sparse_share)
    torch.save({"model": model.state_dict(), "ema": None, "epoch": 3, "val_acc": 50.0,
                "config": {"model": name, "model_kwargs": model_kwargs, "img_size": 64, "dataset": "dtd"}}, path)
    return path


@pytest.mark.slow
def test_prune_cli_prints_the_table_and_writes_a_loadable_file(tmp_path):
    source = train_checkpoint(tmp_path / "best.pt", r=4, blurpool=True, sparse_share=0.35)
    proc = subprocess.run([sys.executable, str(ROOT / "prune.py"), "--checkpoint", str(source), "--percent", "0.3",
                           "--img_size", "64"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "BN scales below 0.01: " in proc.stdout and "--percent 0.3 cuts" in proc.stdout
    assert "before (in -> out)" in proc.stdout and "layer3.0.stci.reduce" in proc.stdout
    assert "params " in proc.stdout and "M -> " in proc.stdout and "FLOPs" in proc.stdout and "check: pruned logits" in proc.stdout
    model, config = model_tools.load_checkpoint_model(tmp_path / "pruned.pt")
    assert config["model_kwargs"] == {"r": 4, "blurpool": True} and config["dataset"] == "dtd"
    assert model.layer3[0].stci.r == 4 and type(model.maxpool[1]).__name__ == "BlurPool2d"
    info = torch.load(tmp_path / "pruned.pt", weights_only=True)["pruning"]
    assert info["params_after"] == models.count_params(model) < info["params_before"]
    assert info["flops_after"] < info["flops_before"] and info["scope"] == "global"


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{tmp}/missing.pt"], "not found"),
    (["--checkpoint", "{tmp}/best.pt", "--percent", "1.5"], "--percent"),
    (["--checkpoint", "{tmp}/best.pt", "--percent", "0"], "--percent"),
    (["--checkpoint", "{tmp}/best.pt", "--out", "{tmp}/best.pt"], "overwrite"),
    (["--checkpoint", "{tmp}/best.pt", "--out", "{tmp}/no/such/dir/p.pt"], "does not exist"),
    (["--checkpoint", "{tmp}/best.pt", "--img_size", "0"], "--img_size 0"),
    (["--checkpoint", "{tmp}/best.pt", "--img_size", "16"], "at least 32 px"),
    (["--checkpoint", "{tmp}/best.pt", "--min_keep", "1"], "--min_keep"),
    (["--checkpoint", "{tmp}/best.pt", "--min_keep", "-0.1"], "--min_keep"),
])
def test_prune_cli_user_errors(tmp_path, capsys, args, message):
    (tmp_path / "best.pt").write_bytes(b"")  # never read: every case fails before loading
    code = utils.run_main(prune.main, [a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0]


# --------------------------------------------------------------------------------------------
# Guard rails: --min_keep, the refusal on unsparsified BN scales, plain state_dicts
# --------------------------------------------------------------------------------------------
def group_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every BatchNorm2d (one per pruned layer and residual stream member)."""
    return {n: m.num_features for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def test_global_threshold_on_unsparsified_scales_would_empty_layer4_without_min_keep():
    """Why the guard rails exist: without --min_keep the global threshold strips layer4's inner widths."""
    fresh = group_widths(unsparsified())
    bare = unsparsified()
    prune.apply_plan(prune.plan_pruning(bare, 0.4, "global", min_keep=0.0))
    assert group_widths(bare)["layer4.0.bn1"] == 1 and group_widths(bare)["layer4.1.bn1"] == 1
    guarded = unsparsified()
    prune.apply_plan(prune.plan_pruning(guarded, 0.4, "global"))
    widths = group_widths(guarded)
    assert widths["layer4.0.bn1"] == widths["layer4.1.bn1"] == 52                  # ceil(0.1 x 512)
    assert all(widths[n] >= math.ceil(0.1 * fresh[n]) for n in fresh)


def test_unsparsified_model_is_refused_then_forced_with_min_keep(tmp_path, capsys):
    source = tmp_path / "best.pt"
    torch.save({"model": unsparsified().state_dict(), "config": {"model": "resnet18", "model_kwargs": {}}}, source)
    args = ["--checkpoint", str(source), "--percent", "0.4", "--img_size", "64"]
    assert utils.run_main(prune.main, args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --percent 0.4 with --scope global would cut ")
    assert "0 of 2880 (0.0%) have a BN scale below 0.01" in err[0]
    assert "--sparsity_reg" in err[0] and "--scope layer" in err[0] and "--force" in err[0]
    assert "BN scales below 0.01: 0.0% of the slimming BatchNorms' scales" in captured.out
    assert not (tmp_path / "pruned.pt").exists()

    assert utils.run_main(prune.main, [*args, "--force"]) == 0
    out = capsys.readouterr().out
    pruned_model, _ = model_tools.load_checkpoint_model(tmp_path / "pruned.pt")
    fresh, widths = group_widths(models.build_model("resnet18", NUM_CLASSES, verbose=False)), group_widths(pruned_model)
    assert all(widths[n] >= math.ceil(0.1 * fresh[n]) for n in fresh), widths
    assert min(widths[n] / fresh[n] for n in fresh) < 0.11          # the floor did bind (layer4's bn1)
    info = torch.load(tmp_path / "pruned.pt", weights_only=True)["pruning"]
    assert info["forced"] and info["min_keep"] == 0.1 and info["removed_channels"] < 0.4 * info["prunable_channels"]
    assert f"{info['removed_channels']} of 2880 removed" in out


def test_sparsified_model_is_pruned_without_force(tmp_path, capsys):
    source = tmp_path / "best.pt"
    model = sparsify(slimmed_model("resnet18"), 0.5)
    torch.save({"model": model.state_dict(), "config": {"model": "resnet18"}}, source)
    assert utils.run_main(prune.main, ["--checkpoint", str(source), "--percent", "0.4", "--img_size", "64"]) == 0
    assert "1440 of 2880 prunable channels (50.0%) by group score; --percent 0.4 cuts 1152" in capsys.readouterr().out
    # Just over the sparse share is refused, and the error names the largest safe --percent.
    assert utils.run_main(prune.main, ["--checkpoint", str(source), "--percent", "0.55", "--out",
                                       str(tmp_path / "p2.pt")]) == 2
    assert "or --percent 0.500 or less" in capsys.readouterr().err


@pytest.mark.slow
def test_plain_resnet18_state_dict_names_its_model(tmp_path, capsys):
    source = tmp_path / "resnet18_plain.pt"
    torch.save(sparsify(slimmed_model("resnet18"), 0.5).state_dict(), source)
    assert utils.run_main(prune.main, ["--checkpoint", str(source), "--img_size", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "taken for twistnet18" in err[0], err
    assert "its weights are those of resnet18 / twistnet18_first_order; pass --model resnet18" in err[0]
    assert "Error(s) in loading state_dict" not in err[0]
    assert utils.run_main(prune.main, ["--checkpoint", str(source), "--img_size", "64", "--model", "resnet18"]) == 0
    model, config = model_tools.load_checkpoint_model(tmp_path / "pruned.pt")
    assert config["model"] == "resnet18" and models.count_params(model) < 0.75 * PINNED["resnet18", 0.0][0]
    # A file whose config names another model is not silently rebuilt as --model.
    assert utils.run_main(prune.main, ["--checkpoint", str(tmp_path / "pruned.pt"), "--model", "twistnet18",
                                       "--out", str(tmp_path / "again.pt")]) == 2
    assert "was trained as resnet18" in capsys.readouterr().err
