"""Network slimming end to end on synthtex at 32 px, in CPU minutes (docs/SLIMMING.md):
train.py --sparsity_reg, prune.py 30% and 50%, train.py --refine; compute_flops.py --checkpoint,
summarize_runs.py and plot_results.py --plot prune on the result. One tiny sweep, shared by every
test of this module. The surgery itself (masked model == pruned model) is tested in test_prune.py.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fixtures  # noqa: E402
import compute_flops  # noqa: E402
import models  # noqa: E402
import plot_results  # noqa: E402
import prune  # noqa: E402
import summarize_runs  # noqa: E402
import train  # noqa: E402
from helpers import model_tools, runrecords, train_cli, utils  # noqa: E402

# Fixtures that take seconds (they train, prune or start processes): their tests are `slow` (tests/conftest.py).
SLOW_FIXTURES = ('slimmed',)

COMMON = ["--dataset", "synthtex", "--model", "twistnet18", "--img_size", "32", "--batch_size", "16",
          "--workers", "0", "--randaug_n", "0", "--mixup", "0", "--cutmix", "0", "--no_progress",
          "--train_per_class", "16", "--warmup_epochs", "0"]
RUN = "synthtex_fold1_twistnet18_seed42_n16"
PERCENTS = (30, 50)


def main_of(module, argv: list[str], capsys) -> str:
    assert utils.run_main(module.main, argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def slimmed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train 3 epochs with --sparsity_reg, prune 30% / 50%, refine each 1 epoch; prune.py's output."""
    root = tmp_path_factory.mktemp("slim")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    outputs = {}
    try:
        assert utils.run_main(train.main, [*COMMON, "--epochs", "3", "--lr", "0.05", "--sparsity_reg", "1e-3",
                                           "--run_dir", str(root)]) == 0
        for percent in PERCENTS:
            out = root / f"pruned{percent}.pt"
            argv = ["--checkpoint", str(root / RUN / "best.pt"), "--percent", str(percent / 100), "--img_size", "32",
                    "--out", str(out)]
            refusal = io.StringIO()
            with contextlib.redirect_stderr(refusal), contextlib.redirect_stdout(io.StringIO()):
                outputs[f"refused{percent}"] = utils.run_main(prune.main, argv), refusal.getvalue()
            text = io.StringIO()
            with contextlib.redirect_stdout(text):   # 3 epochs leave no BN scale below 1e-2: --force
                assert utils.run_main(prune.main, [*argv, "--force"]) == 0
            outputs[percent] = text.getvalue()
            assert utils.run_main(train.main, [*COMMON, "--epochs", "1", "--lr", "0.01", "--refine", str(out),
                                               "--tag", f"pruned{percent}", "--run_dir", str(root)]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "prune_output": outputs}


def results(root: Path, tag: str = "") -> dict:
    name = RUN.replace("twistnet18", f"twistnet18-{tag}") if tag else RUN
    return json.loads((root / name / "results.json").read_text())


def test_sparsity_training_logs_the_share_of_small_bn_scales(slimmed: dict) -> None:
    log = utils.read_jsonl(slimmed["root"] / RUN / "log.jsonl")
    shares = [r["bn_sparsity"] for r in log]
    assert len(shares) == 3 and all(0 <= s <= 1 for s in shares)
    assert "BN scales < 1e-2:" in (slimmed["root"] / RUN / "train.log").read_text()
    assert results(slimmed["root"])["config"]["sparsity_reg"] == 1e-3


def test_the_l1_term_shrinks_bn_scales_and_nothing_else() -> None:
    """One step with and without --sparsity_reg from the same weights on the same batch: every slimming
    BN scale moves towards 0 by more (timm's zero-initialised last BN of a block stays: |0| has no slope),
    and every conv weight moves exactly alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        after = {}
        for reg in ("0", "0.1"):
            args = train_cli.parse_args([*COMMON, "--model", "resnet18", "--sparsity_reg", reg,
                                          "--warmup_epochs", "0", "--lr", "0.1"])
            torch.manual_seed(0)
            trainer = train.Trainer(args, 4, 10, torch.device("cpu"), utils.Console(None, enabled=False))
            before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            torch.manual_seed(1)
            trainer._train_step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
            after[reg] = trainer.model.state_dict()
        moved = 0
        for name in model_tools.slimming_bns(trainer.model):
            key = f"{name}.weight"
            shrink = (after["0.1"][key] - after["0"][key]) * before[key].sign()
            nonzero = before[key] != 0
            assert (shrink[nonzero] < 0).all() and (shrink[~nonzero] == 0).all(), name
            moved += int(nonzero.sum())
        assert moved > 1000
        convs = [k for k in before if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
        assert convs and all(torch.equal(after["0.1"][k], after["0"][k]) for k in convs)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("percent", PERCENTS)
def test_a_short_sparsity_run_is_refused_without_force(slimmed: dict, percent: int) -> None:
    """3 epochs of --sparsity_reg leave (nearly) no BN scale below 1e-2: the global threshold
    would cut channels in use, so prune.py refuses with one line until --force."""
    code, err = slimmed["prune_output"][f"refused{percent}"]
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: --percent {percent / 100:g} with --scope global")
    assert "--sparsity_reg" in lines[0] and "--force" in lines[0]
    assert "BN scales below 0.01: " in slimmed["prune_output"][percent]


@pytest.mark.parametrize("percent", PERCENTS)
def test_pruned_models_are_smaller_and_their_surgery_exact(slimmed: dict, percent: int) -> None:
    text = slimmed["prune_output"][percent]
    params = [float(x) for x in re.search(r"params ([\d.]+)M -> ([\d.]+)M", text).groups()]
    flops = [float(x) for x in re.search(r"FLOPs\s+([\d.]+)G -> ([\d.]+)G", text).groups()]
    difference = float(re.search(r"max \|difference\| ([\d.e+-]+)", text).group(1))
    assert difference < 1e-5
    assert params[0] == pytest.approx(11.569, abs=0.001)        # twistnet18, 8 classes
    assert flops[0] == pytest.approx(0.038, abs=0.001)          # at 32 px
    # Measured (CPU, 1 thread): 30% -> 6.019M params (52.0%), 0.017 GFLOPs; 50% -> 2.039M (17.6%),
    # 0.010 GFLOPs. Which channels go depends on the trained scales, hence the tolerance.
    share, flops_share = PRUNED_SHARES[percent]
    assert params[1] / params[0] == pytest.approx(share, abs=0.08)
    assert flops[1] / flops[0] == pytest.approx(flops_share, abs=0.1)
    assert params[1] < params[0] and flops[1] < flops[0]


PRUNED_SHARES = {30: (0.520, 0.445), 50: (0.176, 0.271)}   # (params, FLOPs) after / before


def test_refined_runs_record_the_pruning_and_load_at_their_widths(slimmed: dict) -> None:
    root = slimmed["root"]
    unpruned = results(root)
    previous = unpruned["params"]
    for percent in PERCENTS:
        refined = results(root, f"pruned{percent}")
        pruned_file = torch.load(root / f"pruned{percent}.pt", weights_only=True)
        assert refined["refined_from"] == str(root / f"pruned{percent}.pt")
        assert refined["pruned_from"] == str(root / RUN / "best.pt") and refined["prune_percent"] == percent / 100
        assert refined["params"] == pruned_file["pruning"]["params_after"] < previous
        assert refined["params_unpruned"] == unpruned["params"]
        assert refined["flops"] < unpruned["flops"]
        assert 0 <= refined["test_acc_pruned"] <= 100 and 0 <= refined["test_acc"] <= 100
        run = root / RUN.replace("twistnet18", f"twistnet18-pruned{percent}")
        model, _ = model_tools.load_checkpoint_model(run / "best.pt")
        assert models.count_params(model) == refined["params"]
        previous = refined["params"]


def test_compute_flops_summary_and_plot_show_pruned_beside_unpruned(slimmed: dict, capsys, tmp_path: Path) -> None:
    root = slimmed["root"]
    pruned = str(root / "pruned50.pt")
    out = main_of(compute_flops, ["--checkpoint", pruned, "--img_size", "32"], capsys)
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("twistnet18 ", pruned))}
    assert float(rows[pruned][1]) < float(rows["twistnet18"][1])     # params (M)
    assert float(rows[pruned][2]) < float(rows["twistnet18"][2])     # GFLOPs
    out = main_of(compute_flops, ["--checkpoint", pruned, "--img_size", "32", "--speed", "--device", "cpu",
                                  "--batch_size", "2", "--warmup", "1", "--repeats", "1", "--steps", "1",
                                  "--threads", "1"], capsys)
    assert pruned in out and "twistnet18" in out
    table = main_of(summarize_runs, ["--run_dir", str(root)], capsys)
    for label in ("twistnet18", "twistnet18-pruned30", "twistnet18-pruned50"):
        assert re.search(rf"^{re.escape(label)}\s", table, re.M), table
    written = plot_results.make_plots(["--plot", "prune", "--run_dir", str(root), "--save_dir", str(tmp_path),
                                       "--formats", "png"])
    assert [p.name for p in written] == ["prune_params.png"] and written[0].stat().st_size > 10_000
    points = plot_results.prune_points(runrecords.load_results([root]), lambda r: r.params / 1e6, "dataset")
    stages = sorted(stage for stage, *_ in points["synthtex", "twistnet18"])
    assert stages == ["pruned", "pruned", "refined", "refined", "unpruned"]


@pytest.mark.parametrize("source, extra, message", [
    ("best", ["--tag", "x"], "is not a prune.py output"),
    ("pruned30.pt", ["--tag", "x", "--model", "resnet18"], "holds a pruned twistnet18"),
    ("pruned30.pt", ["--tag", "x", "--blurpool"], "the same --model_kwargs/--blurpool"),
    ("pruned30.pt", [], "give the run a --tag"),
])
def test_refine_refuses_what_does_not_fit(slimmed: dict, tmp_path: Path, capsys, source: str, extra: list[str],
                                          message: str) -> None:
    path = slimmed["root"] / (f"{RUN}/best.pt" if source == "best" else source)
    argv = [*COMMON, "--epochs", "1", "--refine", str(path), *extra, "--run_dir", str(tmp_path)]
    assert message in fixtures.refused(train.main, argv, tmp_path, capsys)
