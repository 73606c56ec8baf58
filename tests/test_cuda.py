"""The GPU path, where there is a GPU: the dataset moved once, batches that stay there, bf16 autocast,
and torchrun with nccl. Without a CUDA GPU every test here skips, saying so; benchmarks/gpu.sh runs
them (`pytest -m cuda`) on a machine that has one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (PyTorch sees none)")]


def test_the_dataset_moves_to_the_gpu_once_and_batches_stay_there(digits):
    from digitlab.data import InMemoryLoader

    loader = InMemoryLoader(digits.train_images, digits.train_labels, 64, device="cuda")
    assert loader.images.is_cuda and loader.labels.is_cuda
    images, labels = next(loader.batches())
    assert images.is_cuda and labels.is_cuda and images.data_ptr() != loader.images.data_ptr()


def test_cuda_reproduces_the_cpu_losses(digits_dir, tmp_path):
    losses = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        result = run_cli("train", "lenet5", "--device", device, "--epochs", "1", "--batches", "50",
                         "--data-dir", str(digits_dir), "--out", str(out))
        assert result.returncode == 0, result.stderr
        losses[device] = json.loads((out / "history.json").read_text())["batch_loss"]
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["cuda"], losses["cpu"]))
    assert worst < 1e-2  # cuDNN picks other kernels (and TF32 convolutions): close, not bit for bit


def test_bf16_trains_and_its_checkpoint_loads_on_the_cpu(digits_dir, tmp_path):
    out = tmp_path / "bf16"
    result = run_cli("train", "--preset", "fast", "--device", "cuda", "--precision", "bf16",
                     "--data-dir", str(digits_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    history = json.loads((out / "history.json").read_text())
    assert history["config"]["precision"] == "bf16" and history["results"]["test_accuracy"] > 0.9
    evaluated = run_cli("evaluate", str(out), "--json", "--data-dir", str(digits_dir),
                        env={"CUDA_VISIBLE_DEVICES": ""})
    assert evaluated.returncode == 0, evaluated.stderr


def test_torchrun_on_one_gpu_uses_nccl(digits_dir, tmp_path):
    out = tmp_path / "nccl"
    result = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "1",
                             "-m", "digitlab", "train", "lenet5", "--device", "cuda", "--epochs", "1",
                             "--batches", "50", "--data-dir", str(digits_dir), "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=300)
    assert result.returncode == 0, result.stderr
    history = json.loads((out / "history.json").read_text())
    assert history["backend"] == "nccl" and history["world_size"] == 1
