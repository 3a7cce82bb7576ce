"""Training options of train.py / pretrain_imagenet.py: --drop_path, --blurpool (the model-level behaviour
is tested in test_prune.py; here: the flags reach the model and every rebuild of the run)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpers import distributed, train_cli  # noqa: E402
import fixtures  # noqa: E402
import models  # noqa: E402
from helpers import lrfind, model_tools  # noqa: E402
import pretrain_imagenet  # noqa: E402
import train  # noqa: E402
from helpers import utils  # noqa: E402


def drop_rates(model: torch.nn.Module) -> list[float]:
    return [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]


def blurpools(model: torch.nn.Module) -> int:
    return sum(type(m).__name__ == "BlurPool2d" for m in model.modules())


@pytest.mark.parametrize("name", ["twistnet18", "resnet18"])
def test_drop_path_and_blurpool_flags_build_the_model_and_its_rebuilds(name: str, tmp_path: Path) -> None:
    args = train_cli.build_parser().parse_args(["--model", name, "--drop_path", "0.2", "--blurpool"])
    train_cli.validate_args(args)
    trainer = train.Trainer(args, 4, 10, torch.device("cpu"), utils.Console(None, enabled=False))
    assert max(drop_rates(trainer.model)) == pytest.approx(0.2) and blurpools(trainer.model) >= 3
    # A checkpoint's config rebuilds the same model (prune.py, visualize.py, --refine read it so).
    rebuilt, _ = model_tools.model_from_checkpoint(
        {"model": trainer.model.state_dict(), "config": train_cli.config_of(args)})
    assert drop_rates(rebuilt) == drop_rates(trainer.model) and blurpools(rebuilt) == blurpools(trainer.model)
    plain = train.Trainer(train_cli.build_parser().parse_args(["--model", name]), 4, 10, torch.device("cpu"),
                          utils.Console(None, enabled=False))
    assert drop_rates(plain.model) == [] and blurpools(plain.model) == 0


@pytest.mark.parametrize("argv, message", [
    (["--drop_path", "1.0"], "a drop rate in [0, 1)"),
    (["--drop_path", "0.1", "--model_kwargs", '{"drop_path": 0.3}'], "disagree"),
])
def test_bad_drop_path_is_one_error_line(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    argv = ["--dataset", "synthtex", "--run_dir", str(tmp_path), *argv]
    assert message in fixtures.refused(train.main, argv, tmp_path, capsys)


def test_pretraining_takes_drop_path() -> None:
    args = pretrain_imagenet.build_parser().parse_args(["--data", "synthetic", "--drop_path", "0.3"])
    ctx = distributed.DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    model = distributed.build_model(args, 10, ctx, print, warm_start=False)
    assert max(drop_rates(model)) == pytest.approx(0.3)
    assert models.count_params(model) == models.count_params(models.build_model("twistnet18", 10, verbose=False))


# --------------------------------------------------------------------------------------------
# --progressive
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_progressive_trains_early_epochs_at_the_smaller_size_and_logs_it(tmp_path: Path, capsys) -> None:
    argv = ["--dataset", "synthtex", "--model", "resnet18", "--img_size", "32", "--epochs", "3", "--batch_size", "8",
            "--workers", "1", "--train_per_class", "2", "--randaug_n", "0", "--mixup", "0", "--cutmix", "0",
            "--progressive", "16:0.33,24:0.66", "--no_progress", "--run_dir", str(tmp_path)]
    assert utils.run_main(train.main, argv) == 0
    log = utils.read_jsonl(tmp_path / "synthtex_fold1_resnet18_seed42_n2" / "log.jsonl")
    assert [r["img_size"] for r in log] == [16, 24, 32]
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize("spec, message", [("64:0.5", "sizes must lie in 16..--img_size (32)"),
                                           ("16:0.8,24:0.5", "fractions must rise")])
def test_bad_progressive_is_one_error_line(spec: str, message: str, tmp_path: Path, capsys) -> None:
    argv = ["--dataset", "synthtex", "--img_size", "32", "--progressive", spec, "--run_dir", str(tmp_path)]
    assert message in fixtures.refused(train.main, argv, tmp_path, capsys)


# --------------------------------------------------------------------------------------------
# --lr_find
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lr_find_writes_the_curve_and_a_suggestion_and_no_checkpoint(tmp_path: Path, capsys) -> None:
    argv = ["--dataset", "synthtex", "--model", "resnet18", "--img_size", "32", "--batch_size", "8",
            "--workers", "0", "--train_per_class", "4", "--randaug_n", "0", "--lr_find", "--lr_find_steps", "20",
            "--no_progress", "--run_dir", str(tmp_path)]
    assert utils.run_main(train.main, argv) == 0
    run = tmp_path / "synthtex_fold1_resnet18_seed42_n4"
    assert sorted(p.name for p in run.iterdir()) == ["lr_find.json", "lr_find.png"]
    report = json.loads((run / "lr_find.json").read_text())
    lrs = report["lr"]
    # It may stop early where the loss diverges (at a high rate), never before a slope can be measured.
    assert 10 <= len(lrs) == len(report["loss"]) == report["steps_run"] <= 20
    assert lrs[0] == pytest.approx(lrfind.START_LR) and all(b > a for a, b in zip(lrs, lrs[1:]))
    assert lrs[0] < report["suggested_lr"] < lrs[-1]
    out, err = capsys.readouterr()
    assert f"suggested --lr {report['suggested_lr']:.2e}" in out
    # torch-lr-finder's own lines (an unformatted "{finder_name}", its suggestion) and bar are not shown.
    assert "{finder_name}" not in out and "Suggested LR" not in out and "LR suggestion" not in out
    assert len(out.strip().splitlines()) == 1, out
    assert "it/s" not in err and "%|" not in err, err                    # --no_progress: no bar
    assert (run / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
