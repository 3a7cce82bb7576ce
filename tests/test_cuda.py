"""What only a CUDA GPU can check: mixed-precision steps, channels_last and torch.compile, train.py
with each loader, torchrun over NCCL, exact resume. Marked `cuda`: skipped where torch sees no GPU
(conftest.py); `make gpu-check` runs them (pytest -m cuda) and puts the measured differences,
recorded with record_property, into gpu_report.md.

The bounds below are written from the formats' precision, not yet from a measurement on a GPU (no
GPU was at hand when they were written): bf16 keeps 8 bits of mantissa (relative error ~4e-3 per
rounding), fp16 11 bits (~5e-4); one forward and backward through ~20 layers compounds that to
about 1e-2 (bf16) and 2e-3 (fp16) on the loss. The first gpu_report shows the measured values.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn as nn

import models
from fixtures import class_image
from helpers import dali, spark, utils

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
LOSS_BOUND = {torch.bfloat16: 5e-2, torch.float16: 1e-2}          # relative difference to fp32
COSINE_BOUND = {torch.bfloat16: 0.95, torch.float16: 0.99}        # gradient direction vs fp32


@pytest.fixture(autouse=True)
def true_fp32() -> None:
    """fp32 references in fp32: TF32 matmuls and convolutions would blur them to bf16-like precision."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def build(name: str) -> tuple[nn.Module, Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """(the model on the GPU, loss(model, images, labels)); "spark" is SparK on TwistNet-18's encoder."""
    torch.manual_seed(0)
    if name == "spark":
        net = spark.SparkModel(models.build_model("twistnet18", NUM_CLASSES, pretrained=False, verbose=False)).cuda()
        mask = spark.random_active_mask(8, 2, 2, generator=torch.Generator().manual_seed(1)).cuda()
        return net, lambda model, x, y: model(x, mask[:x.shape[0]])
    model = models.build_model(name, NUM_CLASSES, pretrained=False, verbose=False).cuda()
    return model, lambda m, x, y: nn.functional.cross_entropy(m(x).float(), y)


def loss_and_grads(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
                   dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    # fp16: a loss scale that leaves the backward pass inside fp16's range. GradScaler's 2^16 start
    # may overflow on the first step and then halve itself over skipped steps, which is its search,
    # not the arithmetic checked here.
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10, enabled=dtype == torch.float16)
    with utils.autocast(torch.device("cuda"), dtype):
        loss = loss_fn(model, x, y)
    scaler.scale(loss).backward()
    if dtype == torch.float16:
        scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.0))
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return float(loss), grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["twistnet18", "resnet18", "spark"])
def test_mixed_precision_steps_are_finite_and_close_to_fp32(name: str, dtype: torch.dtype,
                                                            record_property: Callable) -> None:
    model, loss_fn = build(name)
    model.train()
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(8, 3, 64, 64, device="cuda", generator=g)
    y = torch.randint(0, NUM_CLASSES, (8,), device="cuda", generator=g)
    state = {k: v.clone() for k, v in model.state_dict().items()}   # BatchNorm statistics move in train mode
    ref_loss, ref_grads = loss_and_grads(model, loss_fn, x, y, None)
    model.load_state_dict(state)
    loss, grads = loss_and_grads(model, loss_fn, x, y, dtype)
    relative = abs(loss - ref_loss) / abs(ref_loss)
    cosine = float(nn.functional.cosine_similarity(grads, ref_grads, dim=0))
    record_property("loss_relative_diff", relative)
    record_property("grad_cosine", cosine)
    assert torch.isfinite(grads).all() and torch.isfinite(torch.tensor(loss))
    assert relative <= LOSS_BOUND[dtype], (ref_loss, loss)
    assert cosine >= COSINE_BOUND[dtype]


@pytest.mark.parametrize("name", ["twistnet18", "resnet18"])
def test_channels_last_gives_the_eager_logits(name: str, record_property: Callable) -> None:
    model, _ = build(name)
    model.eval()
    x = torch.randn(4, 3, 64, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    with torch.no_grad():
        eager = model(x)
        nhwc = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    diff = float((nhwc - eager).abs().max())
    record_property("max_abs_diff", diff)
    # Other cuDNN algorithms, same fp32 arithmetic: differences of summation order only.
    torch.testing.assert_close(nhwc, eager, rtol=1e-4, atol=1e-4)


def test_torch_compile_gives_the_eager_logits(record_property: Callable) -> None:
    model, _ = build("twistnet18")
    model.eval()
    x = torch.randn(4, 3, 64, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(4))
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    diff = float((compiled - eager).abs().max())
    record_property("max_abs_diff", diff)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# The scripts on the GPU
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """imagefolder layout, 2 classes, JPEGs of 96 x 72 (so crops are resampled, as on real data)."""
    root = tmp_path_factory.mktemp("jpegs")
    for split, count in (("train", 32), ("val", 8), ("test", 8)):
        for index in range(2 * count):
            label = index % 2
            path = root / split / f"class_{label}" / f"{index:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            class_image(label, index, 96).resize((96, 72)).save(path, quality=90)
    return root


def run_script(*args: str, code: int = 0, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == code, f"{args}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.parametrize("loader", ["pil", "dali"])
def test_train_py_one_epoch_with_each_loader(loader: str, jpeg_folder: Path, tmp_path: Path,
                                             record_property: Callable) -> None:
    if loader == "dali" and not dali.is_installed():
        pytest.skip("NVIDIA DALI is not installed")
    run_script("train.py", "--dataset", "imagefolder", "--data_dir", str(jpeg_folder), "--loader", loader,
               "--device", "cuda", "--model", "twistnet18", "--epochs", "1", "--img_size", "64", "--batch_size", "16",
               "--workers", "2", "--run_dir", str(tmp_path), "--no_progress")
    run = tmp_path / "imagefolder_fold1_twistnet18_seed42"
    results = json.loads((run / "results.json").read_text())
    [record] = utils.read_jsonl(run / "log.jsonl")
    record_property("images_per_s", record["images_per_s"])
    assert results["loader"] == loader and results["test_acc"] is not None
    assert torch.isfinite(torch.tensor(record["train_loss"]))


def test_torchrun_nccl_runs_pretrain_imagenet_over_every_gpu(tmp_path: Path) -> None:
    gpus = torch.cuda.device_count()
    proc = run_script("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                      "pretrain_imagenet.py", "--data", "synthetic", "--synthetic_images", str(32 * gpus * 4),
                      "--synthetic_val_images", "64", "--num_classes", "10", "--device", "cuda", "--img_size", "64",
                      "--batch_size", "32", "--epochs", "1", "--print_freq", "0", "--workers", "0",
                      "--checkpoint_dir", str(tmp_path / "ckpt"), "--weights_dir", str(tmp_path / "weights"))
    assert f"{gpus} process(es)" in proc.stdout
    [epoch] = [r for r in utils.read_jsonl(tmp_path / "ckpt" / "log.jsonl") if r["type"] == "epoch"]
    assert epoch["train_images"] == 32 * gpus * 4 and epoch["val_images"] == 64


def test_resume_on_cuda_is_exact(tmp_path: Path) -> None:
    """--deterministic: stopped after 3 of 8 steps and resumed, the final weights equal a straight run's."""
    common = ["pretrain_imagenet.py", "--data", "synthetic", "--synthetic_images", "128", "--synthetic_val_images",
              "32", "--num_classes", "10", "--device", "cuda", "--img_size", "64", "--batch_size", "32",
              "--epochs", "2", "--print_freq", "0", "--workers", "0", "--deterministic",
              "--weights_dir", str(tmp_path / "weights")]
    run_script(*common, "--checkpoint_dir", str(tmp_path / "straight"))
    run_script(*common, "--checkpoint_dir", str(tmp_path / "stopped"), "--stop_after_steps", "3", code=130)
    run_script(*common, "--checkpoint_dir", str(tmp_path / "stopped"), "--resume",
               str(tmp_path / "stopped" / "latest.pt"))
    a = torch.load(tmp_path / "straight" / "twistnet18_imagenet.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "twistnet18_imagenet.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
