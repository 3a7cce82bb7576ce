"""Recipe presets (train.py --recipe), schedules, layer-wise lr, decay of every parameter, --stci_init,
fp32 evaluation, and the paper code's run directories in summarize_runs.py.

In-process calls (train_cli.parse_args, train.Trainer, recipes.build_scheduler) wherever the behaviour
can be read there; one short synthtex run checks what a finished run records.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ablation
import models
from helpers import model_tools, recipes, train_cli
import run_all
import summarize_runs
from helpers import runrecords
import train
from helpers import utils
from helpers.utils import UserError

# Fixtures that take seconds (they train, prune or start processes): their tests are `slow` (tests/conftest.py).
SLOW_FIXTURES = ('ed4ee00_run', 'scratch_run')

TINY = ["--dataset", "synthtex", "--img_size", "32", "--batch_size", "16", "--workers", "0", "--no_progress",
        "--deterministic"]


def lrs_over(args_list: list[str], lr: float, steps_per_epoch: int, model: torch.nn.Module | None = None) -> np.ndarray:
    """The lr of the first parameter group at every optimizer step of the whole schedule."""
    args = train_cli.parse_args(args_list)
    model = model or torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(recipes.optimizer_param_groups(model, args, lr), lr=lr)
    scheduler = recipes.build_scheduler(optimizer, args, lr, steps_per_epoch)
    seen = []
    for _ in range(args.epochs * steps_per_epoch):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(seen)


# --------------------------------------------------------------------------------------------
# Presets: defaults, explicit flags win
# --------------------------------------------------------------------------------------------
def test_upstream_scratch_preset_sets_the_published_recipe_and_explicit_flags_win() -> None:
    args = train_cli.parse_args(["--recipe", "upstream_scratch"])
    expected = dict(lr=0.05, batch_size=64, epochs=200, warmup_epochs=10.0, min_lr=1e-5, crop_scale=0.2,
                    clip_grad=1.0, stci_init="upstream", pretrained=False, decay_all=True, warmup_start=0.1,
                    sched_interval="epoch", weight_decay=1e-4, label_smoothing=0.1, nesterov=True, momentum=0.9)
    assert {k: getattr(args, k) for k in expected} == expected
    args = train_cli.parse_args(["--recipe", "upstream_scratch", "--lr", "0.2", "--epochs=3", "--no-decay_all"])
    assert (args.lr, args.epochs, args.decay_all, args.batch_size) == (0.2, 3, False, 64)
    paper = train_cli.parse_args([])
    assert vars(paper) == vars(train_cli.build_parser().parse_args([]))   # 'paper' is today's defaults


def test_stci_init_flag_reaches_the_model_and_a_contradiction_is_refused() -> None:
    def reduce_std(argv: list[str]) -> float:
        args = train_cli.parse_args(argv)
        torch.manual_seed(0)
        model = models.build_model(args.model, 5, verbose=False, **model_tools.model_kwargs_of(vars(args)))
        return float(model.layer3[0].stci.reduce.weight.detach().std())
    assert reduce_std(["--stci_init", "upstream"]) == pytest.approx(0.5, rel=0.05)    # kaiming fan-out, r = 8
    assert reduce_std([]) == pytest.approx(reduce_std(["--stci_init", "paper"]))
    assert reduce_std([]) < 0.05                                                       # PyTorch default
    # The preset's stci_init yields to an explicit --model_kwargs one; two explicit ones must agree.
    args = train_cli.parse_args(["--recipe", "upstream_scratch", "--model_kwargs", '{"stci_init": "paper"}'])
    assert args.stci_init == "paper"
    with pytest.raises(UserError, match="contradicts"):
        train_cli.parse_args(["--stci_init", "upstream", "--model_kwargs", '{"stci_init": "paper"}'])
    baseline = train_cli.parse_args(["--recipe", "upstream_scratch", "--model", "resnet18"])
    assert model_tools.model_kwargs_of(vars(baseline)) == {}    # timm baselines have no STCI


# --------------------------------------------------------------------------------------------
# upstream_ed4ee00: optimizer groups and the transfer, read from a real Trainer
# --------------------------------------------------------------------------------------------
def test_upstream_ed4ee00_gives_5x_lr_to_layer3_layer4_fc_decays_all_and_transfers_two_stages(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import timm
    monkeypatch.chdir(tmp_path)   # no weights/twistnet18_imagenet.pt to find: the ResNet-18 transfer
    torch.manual_seed(3)
    source = timm.create_model("resnet18").state_dict()
    torch.save(source, tmp_path / "resnet18.pth")
    args = train_cli.parse_args([*TINY, "--recipe", "upstream_ed4ee00", "--pretrained",
                             "--resnet18_weights", str(tmp_path / "resnet18.pth")])
    lines: list[str] = []
    trainer = train.Trainer(args, 5, 4, torch.device("cpu"), lines.append)
    log = "\n".join(lines)
    assert "stem+layer1+layer2" in log and "outside the policy" in log
    model, groups = trainer.model, trainer.recipe.optimizer.param_groups
    # The transfer: stem, layer1 and layer2 copied, layer3 (same shapes in ResNet-18) left at init.
    assert torch.equal(model.layer2[1].conv2.weight, source["layer2.1.conv2.weight"])
    assert torch.equal(model.conv1.weight, source["conv1.weight"])
    assert not torch.equal(model.layer3[1].conv2.weight, source["layer3.1.conv2.weight"])
    # The optimizer: every parameter decays; exactly layer3/layer4/fc at 5x the lr.
    names = {id(p): n for n, p in model.named_parameters()}
    fast = {names[id(p)] for g in groups if g["lr_mult"] == 5 for p in g["params"]}
    slow = {names[id(p)] for g in groups if g["lr_mult"] == 1 for p in g["params"]}
    assert fast | slow == set(names.values()) and not fast & slow
    assert fast == {n for n in names.values() if n.startswith(("layer3.", "layer4.", "fc."))}
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    assert {g["lr_mult"]: g["initial_lr"] for g in groups} == {1.0: pytest.approx(0.01), 5.0: pytest.approx(0.05)}
    assert (args.clip_grad, args.crop_scale, args.warmup_start, args.sched_interval) == (1.0, 0.08, 0.1, "epoch")
    # From scratch, from a named checkpoint (ed4ee00's --twistnet_pretrained PATH) or for a baseline the
    # paper code kept one lr: so does the preset (an explicit --lr_mult wins).
    for extra in (["--pretrained", "off"], ["--pretrained", "some/twistnet.pt"], ["--model", "resnet18"]):
        assert train_cli.parse_args(["--recipe", "upstream_ed4ee00", *extra]).lr_mult == ""
    assert train_cli.parse_args(["--recipe", "upstream_ed4ee00", "--lr_mult", "fc=2"]).lr_mult == "fc=2"


def test_upstream_presets_imply_what_the_paper_code_ran() -> None:
    ed4ee00 = train_cli.parse_args(["--recipe", "upstream_ed4ee00"])
    assert (ed4ee00.pretrained, ed4ee00.transfer_policy, ed4ee00.lr_mult) == (True, "stem+layer1+layer2",
                                                                              "layer3,layer4,fc=5")
    for name in ("upstream_ed4ee00", "upstream_scratch"):
        args = train_cli.parse_args(["--recipe", name])
        assert (args.amp, args.split_protocol, args.exif) == ("fp16", "paper_code", "off")
        assert {"amp", "split_protocol", "exif"} <= set(recipes.recipe_summary(args))
    paper = train_cli.parse_args([])
    assert (paper.amp, paper.split_protocol, paper.exif, paper.pretrained) == ("auto", "default", "on", False)
    # fp16 under an upstream preset is the paper code's CUDA autocast: fp32 on a CPU, bf16/fp16 as asked otherwise.
    cpu = torch.device("cpu")
    assert recipes.recipe_amp_dtype(train_cli.parse_args(["--recipe", "upstream_scratch"]), cpu) is None
    assert recipes.recipe_amp_dtype(train_cli.parse_args(["--amp", "fp16"]), cpu) == torch.float16
    line = recipes.amp_line(ed4ee00, None, cpu)
    assert "fp16" in line and "fp32 on the cpu" in line
    cuda = torch.device("cuda")   # only the dtype is resolved: no GPU needed
    assert recipes.recipe_amp_dtype(ed4ee00, cuda) == torch.float16
    assert "amp fp16 with a GradScaler" in recipes.amp_line(ed4ee00, torch.float16, cuda)


def test_upstream_ed4ee00_keeps_the_5x_lr_when_a_twistnet_file_is_found(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    weights = tmp_path / "weights" / "twistnet18_imagenet.pt"
    torch.save(models.build_model("twistnet18", 1000, verbose=False).state_dict(), weights)
    args = train_cli.parse_args([*TINY, "--recipe", "upstream_ed4ee00"])
    assert args.lr_mult == "layer3,layer4,fc=5"   # ed4ee00 decided on the flag, not on which file it loaded
    trainer = train.Trainer(args, 5, 4, torch.device("cpu"), lambda line: None)
    assert sorted(g["lr_mult"] for g in trainer.recipe.optimizer.param_groups) == [1.0, 5.0]
    init = trainer.init
    assert (init["source"], init["path"], init["sha256"]) == ("twistnet_file", str(weights), models.file_sha256(weights))
    # Every tensor but the classifier (1000 classes in the file, 5 here), which is skipped.
    assert (init["skipped"], init["left_at_init"]) == (2, 0)
    assert init["mapped"] == len(trainer.model.state_dict()) - 2


def test_init_records_the_resnet18_file_it_started_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import timm
    monkeypatch.chdir(tmp_path)   # no TwistNet file to find
    torch.manual_seed(5)
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    args = train_cli.parse_args([*TINY, "--pretrained", "--resnet18_weights", str(path)])
    init = train.Trainer(args, 5, 4, torch.device("cpu"), lambda line: None).init
    assert init["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (init["source"], init["transfer_policy"], init["skipped"]) == ("resnet18_transfer", "all", 2)   # fc: 1000 vs 5
    scratch = train.Trainer(train_cli.parse_args(TINY), 5, 4, torch.device("cpu"), lambda line: None).init
    assert (scratch["source"], scratch["mapped"], scratch["sha256"]) == ("scratch", 0, None)
    assert "init resnet18_transfer" in models.init_summary(init) and "sha256 " + init["sha256"][:12] in \
        models.init_summary(init)


@pytest.fixture(scope="module")
def ed4ee00_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One epoch of --recipe upstream_ed4ee00 with a local ResNet-18 file (random weights) and nothing else."""
    import timm
    root = tmp_path_factory.mktemp("ed4ee00")
    torch.manual_seed(4)
    weights = root / "resnet18_random.pth"
    torch.save(timm.create_model("resnet18").state_dict(), weights)
    assert train.main([*TINY, "--recipe", "upstream_ed4ee00", "--resnet18_weights", str(weights), "--epochs", "1",
                       "--train_per_class", "2", "--run_dir", str(root / "runs")]) == 0
    return root / "runs" / "synthtex_fold1_twistnet18_seed42_n2", weights


def test_an_ed4ee00_run_records_the_transfer_the_5x_group_and_fp16(ed4ee00_run: tuple[Path, Path]) -> None:
    path, weights = ed4ee00_run
    results = json.loads((path / "results.json").read_text())
    recipe, init = results["recipe"], results["init"]
    assert (recipe["pretrained"], recipe["lr_mult"], recipe["amp"], recipe["split_protocol"]) == (
        True, "layer3,layer4,fc=5", "fp16", "paper_code")
    assert results["amp_used"] == "off"   # a CPU run: fp32, as the paper code's torch.cuda.amp
    assert init["sha256"] == models.file_sha256(weights) and init["transfer_policy"] == "stem+layer1+layer2"
    # ResNet-18's stem, layer1 and layer2 tensors (BatchNorm counters included) are the ones copied.
    stem = [k for k in torch.load(weights, weights_only=True) if k.startswith(("conv1.", "bn1.", "layer1.", "layer2."))]
    assert init["mapped"] == len(stem) == 60 and init["skipped"] == 0
    log = (path / "train.log").read_text()
    assert "runs in fp32 on the cpu" in log and f"sha256 {init['sha256'][:12]}" in log
    assert "EXIF orientation not applied" in log


def test_lr_mult_syntax_and_a_prefix_matching_nothing_are_clear_errors() -> None:
    assert recipes.parse_lr_mult("layer3,layer4,fc=5; layer2=2") == [(("layer3", "layer4", "fc"), 5.0),
                                                                     (("layer2",), 2.0)]
    for bad in ("layer3", "fc=0", "=3", "fc=x"):
        with pytest.raises(UserError, match="--lr_mult"):
            recipes.parse_lr_mult(bad)
    model = models.build_model("twistnet18", 3, verbose=False)
    args = train_cli.parse_args(["--lr_mult", "layer5=2"])
    with pytest.raises(UserError, match="layer5.*top-level modules are"):
        recipes.optimizer_param_groups(model, args, 0.1)
    # 'layer1' must not catch a 'layer10': prefixes are module paths.
    assert recipes.lr_multiplier("layer10.weight", [(("layer1",), 3.0)]) == 1.0
    assert recipes.lr_multiplier("layer1.0.conv1.weight", [(("layer1",), 3.0)]) == 3.0


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("peak", [0.3, 0.5])
def test_onecycle_peaks_where_configured_and_ends_at_min_lr(peak: float) -> None:
    lrs = lrs_over(["--sched", "onecycle", "--onecycle_peak", str(peak), "--epochs", "10", "--lr", "0.2",
                    "--min_lr", "1e-5"], 0.2, steps_per_epoch=20)
    assert int(np.argmax(lrs)) == round(peak * 200) - 1   # torch's OneCycleLR: the peak ends the first phase
    assert lrs.max() == pytest.approx(0.2)
    assert lrs[0] == pytest.approx(0.2 / 25) and lrs[-1] == pytest.approx(1e-5, rel=0.05)


def test_step_schedule_drops_by_gamma_at_each_milestone() -> None:
    lrs = lrs_over(["--sched", "step", "--step_epochs", "3,6", "--step_gamma", "0.5", "--epochs", "8",
                    "--warmup_epochs", "0"], 0.1, steps_per_epoch=4)
    per_epoch = lrs.reshape(8, 4)
    assert (per_epoch == per_epoch[:, :1]).all()
    assert per_epoch[:, 0] == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025])


def test_per_epoch_schedule_is_the_paper_codes_linear_warmup_then_cosine() -> None:
    """The paper code: SequentialLR(LinearLR(start_factor=0.1, total_iters=W), CosineAnnealingLR(T_max=E-W,
    eta_min)) stepped after each epoch; ours moves per step but holds each epoch's value."""
    epochs, warmup, lr, min_lr = 12, 3, 0.05, 1e-5
    ours = lrs_over(["--recipe", "upstream_scratch", "--epochs", str(epochs), "--warmup_epochs", str(warmup)],
                    lr, steps_per_epoch=3).reshape(epochs, 3)
    assert (ours == ours[:, :1]).all()
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=lr)
    reference = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs - warmup, eta_min=min_lr)],
        milestones=[warmup])
    theirs = []
    for _ in range(epochs):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert ours[:, 0] == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    assert ours[0, 0] == pytest.approx(0.1 * lr)


def test_default_schedule_is_unchanged() -> None:
    lrs = lrs_over(["--epochs", "4", "--warmup_epochs", "1"], 0.01, steps_per_epoch=5)
    assert lrs == pytest.approx([recipes.lr_factor(s, 20, 5, 0.01, 1e-6) * 0.01 for s in range(20)])
    assert lrs[0] == pytest.approx(0.01 / 5)


# --------------------------------------------------------------------------------------------
# Evaluation precision
# --------------------------------------------------------------------------------------------
def test_evaluation_is_fp32_unless_eval_amp() -> None:
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    batches = [(images, labels, 0)]

    def evaluated(*extra: str) -> float:
        args = train_cli.parse_args([*TINY, "--amp", "bf16", *extra])
        torch.manual_seed(1)
        trainer = train.Trainer(args, 5, 4, torch.device("cpu"), lambda *_: None)
        assert trainer.amp_dtype == torch.bfloat16   # training would autocast
        return trainer.evaluate(batches, trainer.model, 5, False, "val")["loss"]

    torch.manual_seed(1)
    model = models.build_model("twistnet18", 5, verbose=False)
    fp32 = utils.evaluate(model, batches, 5, torch.device("cpu"))["loss_sum"] / 8
    assert evaluated() == pytest.approx(fp32, rel=1e-6)
    assert evaluated("--eval_amp") != pytest.approx(fp32, rel=1e-6)


# --------------------------------------------------------------------------------------------
# A finished run records the resolved recipe; run_all and ablation pass --recipe on
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs")
    assert train.main([*TINY, "--recipe", "upstream_scratch", "--epochs", "1", "--run_dir", str(run_dir)]) == 0
    return run_dir


def test_a_scratch_run_records_every_resolved_value(scratch_run: Path) -> None:
    path = scratch_run / "synthtex_fold1_twistnet18_seed42"
    results = json.loads((path / "results.json").read_text())
    recipe = results["recipe"]
    assert recipe["preset"] == "upstream_scratch"
    assert set(recipes.RECIPE_KEYS) <= set(recipe)
    assert {k: recipe[k] for k in ("lr", "batch_size", "epochs", "warmup_epochs", "min_lr", "crop_scale",
                                   "clip_grad", "stci_init", "decay_all", "pretrained")} == dict(
        lr=0.05, batch_size=16, epochs=1, warmup_epochs=10.0, min_lr=1e-5, crop_scale=0.2, clip_grad=1.0,
        stci_init="upstream", decay_all=True, pretrained=False)
    assert results["config"]["recipe"] == "upstream_scratch" and results["config"]["lr"] == 0.05
    assert (recipe["amp"], recipe["split_protocol"], recipe["exif"]) == ("fp16", "paper_code", "off")
    assert results["init"]["source"] == "scratch"
    log = (path / "train.log").read_text()
    assert "recipe upstream_scratch: epochs=1, batch_size=16, lr=0.05" in log
    # The first (and only) epoch ran at 0.1x the lr: the per-epoch warm-up.
    first = json.loads((path / "log.jsonl").read_text().splitlines()[0])
    assert first["lr"] == pytest.approx(0.005)


def test_run_all_passes_the_recipe_and_compares_finished_runs_with_it(scratch_run: Path, capsys) -> None:
    common = ["--dataset", "synthtex", "--models", "twistnet18", "--epochs", "1", "--run_dir", str(scratch_run),
              "--dry_run", "--img_size", "32", "--batch_size", "16", "--workers", "0", "--deterministic"]
    assert run_all.main([*common, "--recipe", "upstream_scratch"]) == 0
    out = capsys.readouterr().out
    assert "--recipe upstream_scratch" in out and "skip" in out
    # Without the preset the same run is another recipe: refused, with the differences named.
    assert utils.run_main(run_all.main, common) == 2
    assert "--recipe: 'upstream_scratch' -> 'paper'" in capsys.readouterr().err


def test_ablation_passes_the_recipe_to_run_all() -> None:
    settings = ablation.Settings("synthtex", "1", "42", None, "runs/x", recipe="upstream_ed4ee00")
    variants = ablation.plan_variants(["r"], {"r": [4]})
    commands = ablation.plan_commands(settings, variants)
    assert commands and all(c[c.index("--recipe") + 1] == "upstream_ed4ee00" for c in commands)
    assert all("--epochs" not in c for c in commands)   # the recipe's epochs, unless --epochs is given


# --------------------------------------------------------------------------------------------
# summarize_runs.py reads the paper code's run directories
# --------------------------------------------------------------------------------------------
def write_paper_code_run(root: Path, model: str, fold: int, test_acc: float, params_m: float) -> None:
    """A run directory exactly as the paper code's train.py leaves it: config.json (vars(args)),
    log.jsonl and results.json with fractions and params_M."""
    path = root / f"dtd_fold{fold}_{model}_seed42"
    path.mkdir(parents=True)
    config = {"data_dir": "data/dtd", "dataset": "dtd", "fold": fold, "img_size": 224, "model": model,
              "pretrained": False, "epochs": 200, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0001,
              "warmup_epochs": 10, "min_lr": 1e-05, "grad_clip": 1.0, "use_mixup": True, "label_smoothing": 0.1,
              "crop_scale_min": 0.2, "crop_scale_max": 1.0, "seed": 42, "num_workers": 4, "amp": True,
              "run_dir": str(root), "resume": False, "checkpoint": None}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "log.jsonl").write_text(json.dumps({"epoch": 1, "lr": 0.005, "train_loss": 3.8, "train_acc": 0.02,
                                                "val_loss": 3.7, "val_acc": 0.03}) + "\n")
    results = {"model": model, "dataset": "dtd", "fold": fold, "seed": 42, "best_val_acc": test_acc + 0.01,
               "test_acc": test_acc, "params_M": params_m, "pretrained": False, "epochs": 200, "lr": 0.05,
               "batch_size": 64, "crop_scale": [0.2, 1.0]}
    (path / "results.json").write_text(json.dumps(results, indent=2))


def test_summarize_reads_paper_code_runs_beside_ours(tmp_path: Path, capsys) -> None:
    theirs = tmp_path / "paper_runs"
    write_paper_code_run(theirs, "twistnet18", 1, 0.6125, 11.59)
    write_paper_code_run(theirs, "twistnet18", 2, 0.6375, 11.59)
    ours = tmp_path / "ours" / "dtd_fold1_twistnet18_seed42"
    ours.mkdir(parents=True)
    (ours / "results.json").write_text(json.dumps({
        "model": "twistnet18", "tag": "", "dataset": "dtd", "fold": 1, "seed": 42, "test_acc": 65.0,
        "params": 11_590_000, "flops": 1.9e9, "img_size": 224, "config": {"lr": 0.01}}))
    runs = runrecords.load_results([theirs, tmp_path / "ours"])
    paper = sorted((r for r in runs if r.source), key=lambda r: r.fold)
    assert [r.test_acc for r in paper] == pytest.approx([61.25, 63.75])
    assert paper[0].params == 11_590_000 and paper[0].label == "twistnet18 [paper code]"
    assert dict(paper[0].recipe)["lr"] == "0.05" and "num_workers" not in dict(paper[0].recipe)
    assert summarize_runs.main(["--run_dir", str(theirs), str(tmp_path / "ours"), "--markdown"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if "[paper code]" in line)
    assert "62.50 ± 1.77" in row                 # (61.25, 63.75): sample std 1.77
    assert any("65.00" in line and "[paper code]" not in line for line in table.splitlines())


def test_a_paper_code_accuracy_that_is_not_a_fraction_is_left_out(tmp_path: Path) -> None:
    write_paper_code_run(tmp_path, "twistnet18", 1, 61.25, 11.59)
    found = runrecords.load_runs([tmp_path])
    assert not found.runs and "fraction" in found.unusable[0][1]


# --------------------------------------------------------------------------------------------
# Split protocol and init in the run records: a cell never mixes protocols; older runs still read
# --------------------------------------------------------------------------------------------
def write_our_run(root: Path, fold: int, config: dict, init: dict | None = None, test_acc: float = 50.0) -> Path:
    path = root / f"fmd_fold{fold}_resnet18_seed42"
    path.mkdir(parents=True)
    results = {"model": "resnet18", "tag": "", "dataset": "fmd", "fold": fold, "seed": 42, "test_acc": test_acc,
               "params": 11_000_000, "flops": None, "config": {**config, "fold": fold}}
    if init is not None:
        results["init"] = init
    (path / "results.json").write_text(json.dumps(results))
    return path


def fmd_config(*extra: str) -> dict:
    return train_cli.config_of(train_cli.parse_args(["--dataset", "fmd", "--model", "resnet18", *extra]))


def test_a_cell_mixing_split_protocols_is_refused_and_an_older_run_counts_as_default(tmp_path: Path, capsys) -> None:
    old = {k: v for k, v in fmd_config().items() if k not in ("split_protocol", "exif", "cache_max_short")}
    write_our_run(tmp_path / "a", 1, old)                                         # before these keys existed
    write_our_run(tmp_path / "a", 2, fmd_config("--split_protocol", "paper_code"))
    assert utils.run_main(summarize_runs.main, ["--run_dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "mix runs of different recipes" in err and 'split_protocol: "default" | "paper_code"' in err
    # The older run beside a new default one: one recipe.
    write_our_run(tmp_path / "b", 1, old)
    write_our_run(tmp_path / "b", 2, fmd_config())
    assert summarize_runs.main(["--run_dir", str(tmp_path / "b")]) == 0


def test_summarize_lists_each_runs_protocol_and_init(tmp_path: Path, capsys) -> None:
    init = {"source": "resnet18_transfer", "path": "/w/r18.pth", "sha256": "ab" * 32, "hub_tag": None,
            "transfer_policy": "all", "mapped": 100, "skipped": 2, "left_at_init": 0}
    write_our_run(tmp_path, 1, fmd_config("--split_protocol", "paper_code"), init)
    write_our_run(tmp_path, 2, fmd_config("--split_protocol", "paper_code"))      # no init: an older train.py
    assert summarize_runs.main(["--run_dir", str(tmp_path), "--runs"]) == 0
    out = capsys.readouterr().out
    assert ("fmd_fold1_resnet18_seed42: 50.00% | paper_code | init resnet18_transfer: /w/r18.pth sha256 abababababab, "
            "policy all; tensors mapped 100, skipped 2, left at init 0") in out
    assert "fmd_fold2_resnet18_seed42: 50.00% | paper_code | init not recorded" in out


def test_a_run_finished_before_the_new_keys_still_compares_equal(tmp_path: Path) -> None:
    config = fmd_config()
    old = {k: v for k, v in config.items() if k not in ("split_protocol", "exif", "cache_max_short")}
    path = write_our_run(tmp_path, 1, {**old, "fold": 1})
    assert train_cli.finished_difference(path, {**config, "fold": 1}) == ""
    paper = train_cli.config_of(train_cli.parse_args(["--dataset", "fmd", "--model", "resnet18", "--split_protocol",
                                                      "paper_code"]))
    assert "--split_protocol: 'default' -> 'paper_code'" in train_cli.finished_difference(path, {**paper, "fold": 1})
