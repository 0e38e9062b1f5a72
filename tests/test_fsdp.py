"""`--fsdp` under torchrun: two gloo processes shard a test model (LoRA and full fine-tuning), train
the loss curve of one process, checkpoint, and resume after a real SIGTERM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fsdp_driver import options
from safetensors.torch import load_file

from slmops.cli import main
from slmops.training.recipe import finetune

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups tested on Linux")
DRIVER = Path(__file__).with_name("fsdp_driver.py")


def torchrun(*args: str, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(DRIVER.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(DRIVER), *args], env=env, capture_output=True, text=True, timeout=300)


def curve(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_lora_sharded_over_two_processes_trains_like_one(tiny_llama, sentiment_file, tmp_path):
    # one process takes the global batch of 8; two take 4 each
    finetune(options(str(tiny_llama), str(sentiment_file), str(tmp_path / "one"), "lora", None,
                     per_device_train_batch_size=8))
    done = torchrun(str(tiny_llama), str(sentiment_file), str(tmp_path / "two"), "lora", "0", "", port=29561)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["resolved"]["world_size"] == 2 and manifest["resolved"]["training_args"]["fsdp"]
    assert manifest["results"]["preflight"]["processes"] == 2
    assert curve(tmp_path / "two") == pytest.approx(curve(tmp_path / "one"), rel=1e-3)
    one, two = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two"))
    assert one.keys() == two.keys()
    assert all((one[k] - two[k]).abs().max() < 0.02 for k in one)  # Adam's first steps magnify rounding
    checkpoint = tmp_path / "two" / "checkpoints" / "checkpoint-6"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # each process wrote its shard


def test_full_fine_tune_sharded_trains_like_one_process_and_resumes_after_sigterm(tiny_llama, sentiment_file, tmp_path):
    args = (str(tiny_llama), str(sentiment_file))
    whole = torchrun(*args, str(tmp_path / "whole"), "full", "0", "", port=29562)
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = torchrun(*args, str(tmp_path / "cut"), "full", "3", "", port=29563)
    assert cut.returncode != 0 and not (tmp_path / "cut" / "manifest.json").exists()
    resumed = torchrun(*args, str(tmp_path / "cut"), "full", "0", "auto", port=29564)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert curve(tmp_path / "cut") == pytest.approx(curve(tmp_path / "whole"), rel=1e-5)
    finetune(options(*args, str(tmp_path / "one"), "full", None, per_device_train_batch_size=8))
    assert curve(tmp_path / "whole") == pytest.approx(curve(tmp_path / "one"), rel=1e-3)
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


@pytest.mark.parametrize("flags, expected", [
    (["--fsdp"], "--fsdp shards the model across processes: launch with torchrun"),
    (["--deepspeed", "ds.json"], "--deepspeed needs CUDA GPUs"),
    (["--fsdp", "--method", "qlora"], "--fsdp does not shard --method qlora's 4-bit base yet"),
])
def test_sharding_flags_that_cannot_work_are_one_line(tiny_llama, sentiment_file, tmp_path, capsys, flags, expected):
    argv = ["finetune", "-m", str(tiny_llama), "-d", str(sentiment_file), "--text_template", "{phrase} {tone}",
            "-o", str(tmp_path / "out"), "--max_steps", "1", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
