"""The registry in models.py as the one source: a variant added there alone reaches ablation.py,
the figures and SparK; TwistNet from other code through torch.hub (hubconf.py) and timm.

Everything runs offline: pretrained weights come from a temporary weights/ folder, never the repo's.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import timm
import timm.data
import timm.loss
import timm.optim
import torch

import ablation
import models
import plot_results
import pretrain_spark
from helpers import spark

ROOT = Path(__file__).resolve().parents[1]
PROBE = "twistnet18_probe"


@pytest.fixture
def probe_variant(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A TwistNet variant that exists in the registry only, for the duration of one test."""
    assert PROBE not in models.MODEL_SPECS
    spec = models.twistnet_spec(PROBE, "ablation", "two heads only", "TwistNet-18 probe", "probe", heads=2)
    monkeypatch.setitem(models.MODEL_SPECS, PROBE, spec)
    yield PROBE


# --------------------------------------------------------------------------------------------
# One source per fact
# --------------------------------------------------------------------------------------------
def test_the_registry_lists_are_the_ones_each_tool_had() -> None:
    core = ["twistnet18", "twistnet18_no_spiral", "twistnet18_no_ais", "twistnet18_first_order"]
    assert models.twistnet_variants() == models.ablation_variants() == core
    assert models.spark_models() == core + ["resnet18", "seresnet18"]
    assert [v.label for v in ablation.plan_variants([])] == core
    assert models.full_model() == ablation.FULL_MODEL == plot_results.DEFAULT_BASELINE == "twistnet18"
    assert models.twistnet_hyperparameters() == ("layers", "stages", "r", "heads", "use_ais", "spiral",
                                                 "gate_init", "drop_path", "blurpool", "stci_init")


def test_a_variant_added_to_the_registry_alone_reaches_every_list(probe_variant: str) -> None:
    # ablation.py: a row of the plan, trained in the one run_all.py command of the registry ablations
    plan = ablation.plan_variants(["r"], {"r": [4]})
    assert [v.label for v in plan] == [*models.ablation_variants()[:-1], probe_variant, "twistnet18-r4"]
    commands = ablation.plan_commands(ablation.Settings("synthtex", "1", "42", 1, "runs/x"), plan)
    assert probe_variant in commands[0][commands[0].index("--models") + 1].split(",")
    assert ablation.count_variant_params(plan[-2], 5) < ablation.count_variant_params(plan[0], 5)  # 2 heads < 4
    # the figures: after the registry ablations and before the sweeps; with the TwistNets, after baselines
    labels = ["twistnet18-r4", probe_variant, "twistnet18_first_order", "twistnet18"]
    assert sorted(labels, key=plot_results.ablation_sort_key) == [
        "twistnet18", "twistnet18_first_order", probe_variant, "twistnet18-r4"]
    assert plot_results.is_twistnet_label(probe_variant) and plot_results.display_name(probe_variant) == "probe"
    # SparK: supported, and accepted by pretrain_spark.py's --model
    assert probe_variant in models.spark_models()
    spark.check_spark_model(probe_variant)
    assert pretrain_spark.build_parser().parse_args(["--model", probe_variant]).model == probe_variant


def test_the_probe_is_gone_after_the_test() -> None:
    assert PROBE not in models.twistnet_variants() + models.spark_models()


def test_sweep_tags_are_written_and_read_by_one_grammar() -> None:
    for family, values in ablation.SWEEP_DEFAULTS.items():
        for value in values:
            variant = ablation.sweep_variant(family, value)
            sweep, text = models.read_sweep_tag(variant.tag)
            assert sweep.name == family and sweep.tag(value) == variant.tag
            assert models.display_name(variant.label) == f"TwistNet-18 ({sweep.reading(text)})"
    assert models.read_sweep_tag("pruned40") is None
    assert models.display_name("twistnet18-heads1") == "TwistNet-18 (1 head)"


def test_a_registry_entry_with_a_keyword_twistnet_lacks_fails_at_once() -> None:
    with pytest.raises(models.ModelConfigError, match="TwistNet takes no head; it takes layers, stages, r"):
        models.twistnet_spec("twistnet18_typo", "ablation", "", "", "", head=2)


# --------------------------------------------------------------------------------------------
# torch.hub
# --------------------------------------------------------------------------------------------
def shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_hub_builds_every_registry_twistnet() -> None:
    model = torch.hub.load(str(ROOT), "twistnet18", source="local", num_classes=47)
    assert shapes(model) == shapes(models.build_model("twistnet18", 47, verbose=False))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 47)
    for name in models.twistnet_variants()[1:]:
        built = torch.hub.load(str(ROOT), name, source="local", num_classes=5, r=4)
        assert shapes(built) == shapes(models.build_model(name, 5, verbose=False, r=4)), name


@pytest.fixture
def weights_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = a temporary folder with weights/twistnet18_imagenet.pt (47 classes, seeded): the lookup
    takes the current directory's weights/ first, so the repo's own weights/ is neither read nor written."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(3)
    path = tmp_path / "weights" / "twistnet18_imagenet.pt"
    path.parent.mkdir()
    torch.save(models.build_model("twistnet18", 47, verbose=False).state_dict(), path)
    return path


@pytest.mark.parametrize("how", ["hub", "timm"])
def test_pretrained_true_uses_the_weights_lookup_of_train_py(how: str, weights_here: Path, capsys) -> None:
    if how == "hub":
        model = torch.hub.load(str(ROOT), "twistnet18", source="local", num_classes=47, pretrained=True)
    else:
        model = timm.create_model("twistnet18", pretrained=True, num_classes=47)
    assert "[Auto-detected] Found TwistNet weights" in capsys.readouterr().out
    saved = torch.load(weights_here, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------
def test_timm_lists_and_builds_every_registry_twistnet() -> None:
    assert sorted(timm.list_models("twistnet*")) == sorted(models.twistnet_variants())
    model = timm.create_model("twistnet18", num_classes=47)
    assert isinstance(model, models.TwistNet)
    assert shapes(model) == shapes(models.build_model("twistnet18", 47, verbose=False))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 47)
    config = timm.data.resolve_data_config({}, model=model)
    assert (config["input_size"], config["mean"], config["crop_pct"]) == ((3, 224, 224), (0.485, 0.456, 0.406), 0.875)
    assert (model.pretrained_cfg["first_conv"], model.pretrained_cfg["classifier"]) == ("conv1", "fc")


def test_timm_keywords_map_or_are_refused_clearly() -> None:
    # what timm's train.py passes by default, and its stochastic depth
    model = timm.create_model("twistnet18_no_ais", num_classes=3, in_chans=3, drop_rate=0.0, drop_path_rate=0.1)
    assert model.layer4[1].drop_path.drop_prob == pytest.approx(0.1)
    assert all(b.stci.ais is None for b in model.twist_blocks().values())
    with pytest.raises(models.ModelConfigError, match="in_chans=1.*RGB"):
        timm.create_model("twistnet18", in_chans=1)
    with pytest.raises(models.ModelConfigError, match="got bn_momentum, which TwistNet does not take"):
        timm.create_model("twistnet18", bn_momentum=0.01)


def test_timm_style_training_lowers_the_loss(one_torch_thread) -> None:
    torch.manual_seed(0)
    model = timm.create_model("twistnet18", num_classes=47)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    loss_fn = timm.loss.LabelSmoothingCrossEntropy(smoothing=0.1)
    images, targets = torch.randn(8, 3, 64, 64), torch.arange(8) % 47
    losses = []
    for _ in range(6):
        loss = loss_fn(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # ln(47) = 3.85 at the start; six AdamW steps on one batch of 8 fit it (measured 4.03 -> 0.77)
    assert losses[0] == pytest.approx(3.85, abs=0.5)
    assert losses[-1] < 0.4 * losses[0], losses


@pytest.mark.slow
def test_registration_is_lazy_and_idempotent_on_reimport() -> None:
    """In a fresh process: importing models does not import timm; importing timm registers the
    TwistNets; reloading models.py re-registers them quietly, building the reloaded class; a star
    import of models still gives every name."""
    code = """
import importlib, json, sys, warnings
import models
lazy = "timm" not in sys.modules
import timm
import timm.data
import timm.loss
import timm.optim
listed = timm.list_models("twistnet*")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    importlib.reload(models)
fresh = isinstance(timm.create_model("twistnet18", num_classes=2), models.TwistNet)
star = {}
exec("from models import *", star)   # timm writes the entry points into a module's __all__: not into ours
print(json.dumps({"lazy": lazy, "listed": listed, "fresh": fresh, "star": "build_model" in star,
                  "warnings": [str(w.message) for w in caught if "twistnet" in str(w.message).lower()]}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"lazy": True, "listed": sorted(models.twistnet_variants()), "fresh": True, "star": True,
                      "warnings": []}
