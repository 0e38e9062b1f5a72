"""`torchrun --nproc_per_node 2 slmops finetune ...` trains data-parallel (gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import TEMPLATE


def finetune_cmd(model, data, out, per_device: int) -> list[str]:
    return ["-m", "slmops", "finetune", "-m", str(model), "-d", str(data), "--text_template", TEMPLATE, "-o", str(out),
            "--max_steps", "4", "--per_device_train_batch_size", str(per_device), "--lora_dropout", "0",
            "--learning_rate", "5e-3", "--logging_steps", "1", "--eval_split", "train[:4]", "--log_level", "2"]


def curve(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups tested on Linux")
def test_two_cpu_processes_match_one_with_same_global_batch(tiny_llama, sentiment_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    single = subprocess.run([sys.executable, *finetune_cmd(tiny_llama, sentiment_file, tmp_path / "one", 8)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    ddp = subprocess.run(launcher + finetune_cmd(tiny_llama, sentiment_file, tmp_path / "two", 4),
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["resolved"]["world_size"] == 2
    assert curve(tmp_path / "two") == pytest.approx(curve(tmp_path / "one"), rel=1e-3)
