"""plot_results.py and visualize.py on CPU: every plot kind writes a 300 dpi PNG and a PDF.

Aggregate and per-run plots read synthetic results.json / log.jsonl files with known numbers
written here; the interaction plot and visualize.py use a real (untrained) TwistNet-18
checkpoint at 64 px. visualize.py's JSON is checked against model_tools.gate_values /
model_tools.stci_internals, and its Grad-CAM against a hand-written computation.
"""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import datasets
import fixtures
import models  # the repository root is on sys.path through tests/conftest.py
import plot_results
import transforms
import visualize
from helpers import figures, model_tools, utils

ROOT = Path(__file__).resolve().parents[1]
DPI = 300
DATASETS = ("dtd", "fmd", "kth_tips2")
MODELS = ("resnet18", "seresnet18", "twistnet18")
FOLDS, SEEDS = (1, 2), (42, 43)
PARAMS = {"resnet18": 11_200_000, "seresnet18": 11_290_000, "twistnet18": 11_590_000}


def known_accuracy(model: str, dataset: str, fold: int, seed: int) -> float:
    """A distinct, reproducible accuracy for every synthetic run."""
    return 60.0 + 5 * MODELS.index(model) + 3 * DATASETS.index(dataset) + 1.5 * fold + 0.25 * (seed - 42)


def write_results(run_dir: Path, model: str, dataset: str, fold: int, seed: int, acc: float,
                  tag: str = "", classes: int = 4) -> Path:
    label = f"{model}-{tag}" if tag else model
    path = run_dir / f"{dataset}_fold{fold}_{label}_seed{seed}" / "results.json"
    path.parent.mkdir(parents=True)
    confusion = [[10 if i == j else 1 for j in range(classes)] for i in range(classes)]
    path.write_text(json.dumps({
        "model": model, "tag": tag, "dataset": dataset, "fold": fold, "seed": seed, "test_acc": acc,
        "params": PARAMS.get(model, 11_500_000), "flops": 1.82e9 + 3e7 * (model == "twistnet18"),
        "img_size": 224, "classes": [f"class_{k}" for k in range(classes)], "confusion": confusion,
        "per_class_acc": [100 * 10 / (10 + classes - 1)] * classes, "config": {"model": model, "tag": tag},
    }))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for dataset in DATASETS:
        for model in MODELS:
            for fold in FOLDS:
                for seed in SEEDS:
                    write_results(root, model, dataset, fold, seed, known_accuracy(model, dataset, fold, seed))
    for tag, acc in (("r4", 70.0), ("r16", 71.0)):
        write_results(root, "twistnet18", "dtd", 1, 42, acc, tag=tag)
    for name, acc in (("twistnet18_no_spiral", 66.0), ("twistnet18_no_ais", 67.0)):
        write_results(root, name, "dtd", 1, 42, acc)
    return root


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("log") / "synthtex_fold1_twistnet18_seed42" / "log.jsonl"
    path.parent.mkdir()
    blocks = ("layer3.0", "layer3.1", "layer4.0", "layer4.1")
    with path.open("w") as f:
        for epoch in range(1, 9):
            record = {"epoch": epoch, "lr": 0.01, "train_loss": 2.0 / epoch, "train_acc": 40 + 5 * epoch,
                      "gates": {b: 0.12 + 0.01 * i * epoch for i, b in enumerate(blocks)}}
            if epoch % 2 == 0:  # --eval_every 2: validation only on even epochs
                record.update(val_loss=2.2 / epoch, val_acc=35 + 5 * epoch)
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = models.build_model("twistnet18", 5, verbose=False)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save({"model": model.state_dict(), "ema": None, "epoch": 1,
                "config": {"model": "twistnet18", "img_size": 64, "model_kwargs": {}, "tag": ""}}, path)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    yy, xx = np.mgrid[0:80, 0:96]
    stripes = 127 + 120 * np.sin(0.4 * xx + 0.25 * yy)
    rgb = np.stack([stripes, 255 - stripes, np.full_like(stripes, 90)], axis=-1).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "stripes.png"
    Image.fromarray(rgb).save(path)
    return path


def pdf_page_inches(path: Path) -> tuple[float, float]:
    match = re.search(rb"/MediaBox\s*\[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", path.read_bytes())
    assert match, f"no MediaBox in {path}"
    return float(match[1]) / 72, float(match[2]) / 72


def assert_figure(paths: list[Path], width_in: float) -> tuple[int, int]:
    """Non-empty PNG + PDF; the PNG is the PDF's page at 300 dpi and `width_in` inches wide."""
    by_suffix = {p.suffix: p for p in paths}
    png, pdf = by_suffix[".png"], by_suffix[".pdf"]
    assert png.stat().st_size > 1000 and pdf.stat().st_size > 1000
    assert pdf.read_bytes().startswith(b"%PDF")
    with Image.open(png) as img:
        img.load()
        size, dpi = img.size, img.info.get("dpi")
    page_w, page_h = pdf_page_inches(pdf)
    assert page_w == pytest.approx(width_in, abs=1e-3)
    assert abs(size[0] - width_in * DPI) <= 1
    assert abs(size[1] - page_h * DPI) <= 1
    assert dpi is not None and dpi[0] == pytest.approx(DPI, abs=0.5)
    return size


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------
def test_loader_groups_runs_by_label_and_dataset(run_dir: Path) -> None:
    runs = plot_results.load_results([run_dir])
    assert len(runs) == len(DATASETS) * len(MODELS) * len(FOLDS) * len(SEEDS) + 4
    stats = plot_results.accuracy_stats(runs)
    for dataset in DATASETS:
        for model in MODELS:
            values = [known_accuracy(model, dataset, f, s) for f in FOLDS for s in SEEDS]
            s = stats[(model, dataset)]
            assert s.n == 4
            assert s.mean == pytest.approx(statistics.mean(values))
            assert s.std == pytest.approx(statistics.stdev(values))
    # One run: the mean, no sample std (undefined, as in the tables) and no error bar.
    single = stats[("twistnet18-r4", "dtd")]
    assert (single.mean, single.std, single.n, single.error_bar) == (70.0, None, 1, 0.0)
    by_fold = plot_results.accuracy_stats(runs, group_by="dataset_fold")
    assert by_fold[("resnet18", "fmd/2")].mean == pytest.approx(
        statistics.mean(known_accuracy("resnet18", "fmd", 2, s) for s in SEEDS))


def test_display_names_read_sweep_tags() -> None:
    assert plot_results.display_name("twistnet18-r4") == "TwistNet-18 (r = 4)"
    assert plot_results.display_name("twistnet18-gate-4") == "TwistNet-18 (gate init -4)"
    assert plot_results.display_name("twistnet18-stages234") == "TwistNet-18 (STCI in stages 2,3,4)"
    labels = ["twistnet18-stages234", "twistnet18-r16", "twistnet18_no_ais", "twistnet18-r4", "twistnet18"]
    assert sorted(labels, key=plot_results.ablation_sort_key) == [
        "twistnet18", "twistnet18_no_ais", "twistnet18-r4", "twistnet18-r16", "twistnet18-stages234"]


# --------------------------------------------------------------------------------------------
# Aggregate plots
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, stem, width", [
    (["--plot", "bar", "--models", "resnet18,seresnet18,twistnet18"], "bar", 7.0),
    (["--plot", "bar", "--datasets", "dtd", "--models", "resnet18,twistnet18"], "bar", 3.5),
    (["--plot", "radar", "--models", "resnet18,seresnet18,twistnet18"], "radar", 3.5),
    (["--plot", "scatter", "--x", "params", "--models", "resnet18,seresnet18,twistnet18"], "scatter_params", 7.0),
    (["--plot", "scatter", "--x", "flops", "--datasets", "dtd"], "scatter_flops", 3.5),
    (["--plot", "ablation", "--datasets", "dtd"], "ablation", 3.5),
])
def test_aggregate_plots_write_png_and_pdf(run_dir: Path, tmp_path: Path, argv: list[str],
                                           stem: str, width: float) -> None:
    written = plot_results.make_plots([*argv, "--run_dir", str(run_dir), "--save_dir", str(tmp_path)])
    assert sorted(p.name for p in written) == [f"{stem}.pdf", f"{stem}.png"]
    assert_figure(written, width)


def test_radar_needs_three_axes(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(utils.UserError, match="at least 3 axes"):
        plot_results.make_plots(["--plot", "radar", "--run_dir", str(run_dir), "--datasets", "dtd,fmd",
                           "--save_dir", str(tmp_path)])
    # per-fold axes make a radar chart out of one dataset's folds (here 2 datasets x 2 folds)
    written = plot_results.make_plots(["--plot", "radar", "--run_dir", str(run_dir), "--datasets", "dtd,fmd",
                                 "--group_by", "dataset_fold", "--models", "resnet18,twistnet18",
                                 "--save_dir", str(tmp_path)])
    assert_figure(written, 3.5)


def test_ablation_annotates_deltas_to_the_full_model(run_dir: Path) -> None:
    runs = plot_results.load_results([run_dir])
    runs = plot_results.filter_runs(runs, datasets=["dtd"])
    stats = plot_results.accuracy_stats(runs)
    labels = plot_results.ordered_labels(runs)
    with figures.paper_style():
        fig = plot_results.ablation_figure(stats, labels, ["dtd"])
        fig.canvas.draw()
    texts = [t.get_text() for t in fig.axes[0].texts]
    full = stats[("twistnet18", "dtd")].mean
    expected = plot_results.signed(70.0 - full)
    assert expected in texts and f"{full:.1f}" in texts


# --------------------------------------------------------------------------------------------
# Per-run plots
# --------------------------------------------------------------------------------------------
def test_curves_and_gate_plots(log_file: Path, tmp_path: Path) -> None:
    curves = plot_results.make_plots(["--plot", "curves", "--log_file", str(log_file), "--save_dir", str(tmp_path)])
    assert {p.name for p in curves} == {"curves_synthtex_fold1_twistnet18_seed42.png",
                                        "curves_synthtex_fold1_twistnet18_seed42.pdf"}
    assert_figure(curves, 7.0)
    gate = plot_results.make_plots(["--plot", "gate", "--log_file", str(log_file), "--save_dir", str(tmp_path),
                              "--name", "gate"])
    assert_figure(gate, 3.5)


@pytest.fixture
def gate_run(log_file: Path, tmp_path: Path) -> Path:
    """A copy of the run directory of log_file, to put a best.pt or results.json beside its log."""
    run = tmp_path / log_file.parent.name
    run.mkdir()
    (run / "log.jsonl").write_text(log_file.read_text())
    return run


def gate_cli(run: Path, capsys) -> tuple[int, str]:
    code = utils.run_main(plot_results.main, ["--plot", "gate", "--log_file", str(run / "log.jsonl"),
                                              "--save_dir", str(run / "figures")])
    return code, capsys.readouterr().err


def test_gate_reads_the_initial_gate_from_best_pt_safely(gate_run: Path, capsys) -> None:
    config = {"model": "twistnet18", "model_kwargs": {"gate_init": -4.0}}
    torch.save({"model": {}, "val_acc": 50.0, "config": config}, gate_run / "best.pt")
    assert plot_results.gate_init_of(gate_run / "log.jsonl") == -4.0
    (gate_run / "best.pt").write_bytes(b"PK\x03\x04 a zip that stops here")   # a damaged copy
    code, err = gate_cli(gate_run, capsys)
    line = fixtures.one_error_line(err)
    assert code == 2 and "Could not read checkpoint" in line and "best.pt" in line, line
    assert "weights_only" not in err and not (gate_run / "figures").exists()


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"text"', '{"config": [1]}'])
def test_gate_with_a_results_json_that_is_no_record_is_one_error_line(content: str, gate_run: Path, capsys) -> None:
    (gate_run / "results.json").write_text(content)
    code, err = gate_cli(gate_run, capsys)
    line = fixtures.one_error_line(err)
    assert code == 2 and str(gate_run / "results.json") in line, line


@pytest.mark.slow
def test_an_unknown_plot_kind_is_one_error_line_listing_the_kinds(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "plot_results.py", "--plot", "nosuch", "--run_dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = fixtures.one_error_line(proc.stderr)
    assert proc.returncode == 2 and "unknown --plot kind 'nosuch'" in line
    assert line.endswith("Choose from: " + ", ".join(plot_results.PLOTS)), line
    assert list(plot_results.PLOTS) == ["bar", "radar", "scatter", "efficiency", "ablation", "prune",
                                        "curves", "gate", "confusion", "interaction", "tsne"]


def test_a_misspelt_plot_kind_is_named_not_drawn(run_dir: Path, tmp_path: Path, capsys) -> None:
    argv = ["--plot", "ablaton", "--run_dir", str(run_dir), "--save_dir", str(tmp_path)]
    assert "Did you mean 'ablation'?" in fixtures.refused(plot_results.main, argv, tmp_path, capsys)


def test_gate_figure_draws_logged_values(log_file: Path) -> None:
    records = plot_results.read_log(log_file)
    with figures.paper_style():
        fig = plot_results.gate_figure(records, gate_init=-2.0)
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    np.testing.assert_allclose(lines["layer3.1"].get_ydata(), [r["gates"]["layer3.1"] for r in records])
    assert lines["init (-2)"].get_ydata()[0] == pytest.approx(1 / (1 + np.exp(2.0)))
    with pytest.raises(utils.UserError, match="no TwistBlock gates"):
        plot_results.gate_figure([{"epoch": 1, "gates": {}}])


def test_confusion_plot(run_dir: Path, tmp_path: Path) -> None:
    results = next(run_dir.glob("dtd_fold1_twistnet18_seed42/results.json"))
    written = plot_results.make_plots(["--plot", "confusion", "--results", str(results), "--save_dir", str(tmp_path),
                                 "--name", "confusion"])
    assert_figure(written, 3.5)


def test_confusion_thins_labels_for_many_classes() -> None:
    n = 120
    confusion = np.eye(n, dtype=int) * 5 + 1
    classes = [f"texture_{k:03d}" for k in range(n)]
    with figures.paper_style():
        fig = plot_results.confusion_figure(confusion, classes)
    ax = fig.axes[0]
    shown = [t.get_text() for t in ax.get_xticklabels()]
    assert 20 <= len(shown) <= 50 and shown[0] == "texture_000"
    assert fig.get_figwidth() == pytest.approx(7.0)
    image = ax.collections[0].get_array().reshape(n, n)
    assert image[0, 0] == pytest.approx(100 * 6 / (6 + n - 1))  # rows are % of the true class


@pytest.mark.slow
def test_interaction_plot(checkpoint: Path, image: Path, tmp_path: Path) -> None:
    written = plot_results.make_plots(["--plot", "interaction", "--checkpoint", str(checkpoint), "--image", str(image),
                                 "--save_dir", str(tmp_path), "--name", "interaction"])
    assert_figure(written, 7.0)


def test_interaction_colour_scale_diverges_only_for_clear_negatives() -> None:
    assert figures.interaction_colour_scale(-0.001, 0.5)[1] == "magma"
    norm, cmap = figures.interaction_colour_scale(-0.3, 0.5)
    assert cmap == "RdBu_r" and (norm.vmin, norm.vmax) == (-0.5, 0.5)


def test_interaction_figure_titles_heads_by_direction(checkpoint: Path, image: Path) -> None:
    model, _ = model_tools.load_checkpoint_model(checkpoint)
    x, _ = transforms.load_image_tensor(image, 64)
    internals = model_tools.stci_internals(model, x)
    with figures.paper_style():
        fig = plot_results.interaction_figure(internals)
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == 4 * len(internals)
    assert [ax.get_title() for ax in heatmaps[:4]] == ["0°", "45°", "90°", "135°"]
    np.testing.assert_allclose(heatmaps[5].images[0].get_array(),
                               internals["layer3.1"]["interaction"][1].numpy())


# --------------------------------------------------------------------------------------------
# visualize.py
# --------------------------------------------------------------------------------------------
def reference_input(image: Path, img_size: int) -> torch.Tensor:
    import transforms
    with Image.open(image) as img:
        return transforms.build_eval_transform(img_size)(img.convert("RGB")).unsqueeze(0)


@pytest.mark.slow
def test_visualize_json_equals_model_introspection(checkpoint: Path, image: Path, tmp_path: Path) -> None:
    visualize.explain(["--checkpoint", str(checkpoint), "--image", str(image), "--out_dir", str(tmp_path),
                       "--blocks", "all", "--name", "vis"])
    assert_figure([tmp_path / "vis.png", tmp_path / "vis.pdf"], 7.0)
    report = json.loads((tmp_path / "vis.json").read_text())

    model = models.build_model("twistnet18", 5, pretrained=str(checkpoint), verbose=False).eval()
    x = reference_input(image, 64)   # img_size comes from the checkpoint's config
    assert report["img_size"] == 64
    assert report["gates"] == pytest.approx(model_tools.gate_values(model), rel=1e-6)
    internals = model_tools.stci_internals(model, x)
    assert list(report["blocks"]) == list(internals)
    for name, entry in internals.items():
        block = report["blocks"][name]
        np.testing.assert_allclose(block["interaction"], entry["interaction"].numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(block["ais"], entry["ais"].numpy(), rtol=1e-5, atol=1e-7)
        assert block["gate"] == pytest.approx(float(entry["gate"]), rel=1e-6)
        r = entry["interaction"].shape[-1]
        for d, row in enumerate(block["ais_by_direction"]):
            assert row["angle"] == models.HEAD_ANGLES[d]
            assert row["z"] == pytest.approx(float(entry["ais"][d, :r].mean()), rel=1e-5)
            assert row["products"] == pytest.approx(float(entry["ais"][d, r:].mean()), rel=1e-5)

    with torch.no_grad():
        probs = model(x).softmax(dim=1)[0]
    top = probs.topk(5)
    assert [t["index"] for t in report["top5"]] == top.indices.tolist()
    np.testing.assert_allclose([t["prob"] for t in report["top5"]], top.values.numpy(), rtol=1e-5)
    assert report["prediction"]["index"] == int(probs.argmax())
    assert report["gradcam"]["target_class"] == int(probs.argmax())


def manual_grad_cam(model: torch.nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """Grad-CAM written out by hand: forward to layer4, gradient of the class score, weighted sum."""
    with torch.enable_grad():
        h = model.maxpool(F.relu(model.bn1(model.conv1(x))))
        act = model.layer4(model.layer3(model.layer2(model.layer1(h))))
        score = model.fc(act.mean(dim=(2, 3)))[0, target]
        (grad,) = torch.autograd.grad(score, act)
    cam = F.relu((grad.mean(dim=(2, 3))[:, :, None, None] * act).sum(dim=1))[0].detach()
    return cam / cam.max()


def test_grad_cam_matches_a_hand_computation(checkpoint: Path, image: Path) -> None:
    model, _ = model_tools.load_checkpoint_model(checkpoint)
    x = reference_input(image, 64)
    for target in (None, 3):
        cam, logits, chosen = visualize.grad_cam(model, x, "layer4", target)
        assert chosen == (int(logits.argmax()) if target is None else 3)
        expected = manual_grad_cam(model, x, chosen)
        np.testing.assert_allclose(cam.numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)
        big = visualize.upsample_cam(cam, (64, 64))
        assert big.shape == (64, 64) and 0 <= big.min() and big.max() <= 1
    assert all(p.grad is None for p in model.parameters())  # Grad-CAM leaves no gradients behind


def test_visualize_handles_variants_without_ais(tmp_path: Path, image: Path) -> None:
    model = models.build_model("twistnet18_no_ais", 5, verbose=False)
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "ema": None, "epoch": 1,
                "config": {"model": "twistnet18_no_ais", "img_size": 64, "model_kwargs": {}}}, path)
    report = visualize.explain(["--checkpoint", str(path), "--image", str(image), "--out_dir", str(tmp_path),
                                "--formats", "png"])
    assert all("ais" not in block for block in report["blocks"].values())
    assert (tmp_path / f"{image.stem}_{tmp_path.name}.png").is_file()


# --------------------------------------------------------------------------------------------
# efficiency and t-SNE
# --------------------------------------------------------------------------------------------
def test_efficiency_puts_each_model_at_its_measured_speed(run_dir: Path, tmp_path: Path) -> None:
    rates = {"resnet18": 120.0, "seresnet18": 110.0, "twistnet18": 100.0}
    speed = tmp_path / "speed.json"    # the shape of compute_flops.py --speed --json
    speed.write_text(json.dumps([{"name": n, "train_img_s": r / 3, "infer_img_s": r, "device": "CPU: test"}
                                 for n, r in rates.items()]))
    runs = plot_results.filter_runs(plot_results.load_results([run_dir]), list(rates), ["dtd"])
    cost, unit = plot_results.speed_axis(speed, "infer")
    assert unit == "infer images/s\n(CPU: test)"
    with figures.paper_style():
        fig = plot_results.scatter_figure(runs, list(rates), ["dtd"], cost, unit)
    points = {bars.get_label(): (bars.lines[0].get_xdata()[0], bars.lines[0].get_ydata()[0])
              for bars in fig.axes[0].containers}
    for name, rate in rates.items():
        values = [known_accuracy(name, "dtd", f, s) for f in FOLDS for s in SEEDS]
        assert points[plot_results.display_name(name)] == pytest.approx((rate, statistics.mean(values)))
    written = plot_results.make_plots(["--plot", "efficiency", "--run_dir", str(run_dir), "--speed_json", str(speed),
                                       "--save_dir", str(tmp_path)])
    assert_figure(written, 7.0)
    with pytest.raises(utils.UserError, match="compute_flops.py --speed --json"):
        plot_results.make_plots(["--plot", "efficiency", "--run_dir", str(run_dir), "--speed_json",
                                 str(tmp_path / "missing.json"), "--save_dir", str(tmp_path)])


@pytest.mark.slow
def test_tsne_embeds_every_image_of_the_split(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.build_model("twistnet18", 8, verbose=False)
    path = tmp_path / "synthtex_fold1_twistnet18_seed42" / "best.pt"
    path.parent.mkdir()
    torch.save({"model": model.state_dict(), "ema": None, "epoch": 1,
                "config": {"model": "twistnet18", "dataset": "synthtex", "fold": 1, "img_size": 32}}, path)
    written = plot_results.make_plots(["--plot", "tsne", "--checkpoint", str(path), "--split", "val",
                                       "--save_dir", str(tmp_path), "--name", "tsne"])
    assert_figure(written, 3.5)
    sets, classes = datasets.build_datasets("synthtex", None, 1, transforms.build_eval_transform(32),
                                            transforms.build_eval_transform(32), synthtex_size=37)
    features, labels = plot_results.penultimate_features(model, sets["val"], max_images=100, seed=0)
    assert features.shape == (100, 512) and set(labels.tolist()) <= set(range(8))
    with torch.no_grad():   # the features the classifier reads: fc of them gives the model's logits
        x = torch.stack([sets["val"][i][0] for i in range(4)])
        model.eval()
        np.testing.assert_allclose(model.fc(model_tools.penultimate(model, x)).numpy(), model(x).numpy(),
                                   rtol=1e-5, atol=1e-5)
    embedding = plot_results.tsne_embedding(features, perplexity=30, seed=0)
    assert embedding.shape == (100, 2) and np.isfinite(embedding).all()
