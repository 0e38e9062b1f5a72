"""Full fine-tuning of SmolLM2-135M-Instruct: one process, two data-parallel processes (DDP), and two
sharded ones (--fsdp), on one machine, one run after another.

Prints each run's peak resident memory per process (sampled from outside every 0.1 s, for every
process of the run), the loss curve's largest relative difference from the one-process run (same
global batch, same seed, same data order), the pre-flight's weights + gradients + AdamW state per
process, and the wall time.

    python benchmarks/fsdp_memory.py --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from tables import markdown

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "<|im_start|>user\n{phrase}<|im_end|>\n<|im_start|>assistant\n{tone}<|im_end|>"


def command(out: Path, steps: int, per_device: int, data: str) -> list[str]:
    return ["-m", "slmops", "finetune", "-m", "smollm2-135m-instruct", "-d", data, "--train_split", "train[:512]",
            "--eval_split", "train[-32:]", "--text_template", TEMPLATE, "--method", "full", "--torch_dtype",
            "float32", "--max_steps", str(steps), "--per_device_train_batch_size", str(per_device),
            "--learning_rate", "2e-5", "--logging_steps", "1", "--save_steps", str(steps), "-o", str(out)]


def measured(argv: list[str], env: dict) -> tuple[float, list[float]]:
    """(wall seconds, peak RSS in MB of each process that trained)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, float] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in family:
            try:
                peaks[p.pid] = max(peaks.get(p.pid, 0.0), p.memory_info().rss / 2**20)
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.1)
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(argv[:8])} failed:\n{err[-3000:]}")
    trained = sorted(peaks.values(), reverse=True)  # torchrun's own agent is the smallest: left out below
    return time.perf_counter() - started, trained


def curve(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows per step)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "train.jsonl"))
    args = ap.parse_args()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29591"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="slmops-fsdp-bench-") as tmp:
        runs = [("1 process", [sys.executable, *command(Path(tmp) / "one", args.steps, args.batch, args.data)], 1),
                ("2 processes, DDP", launcher + command(Path(tmp) / "ddp", args.steps, args.batch // 2, args.data), 2),
                ("2 processes, --fsdp", launcher + command(Path(tmp) / "fsdp", args.steps, args.batch // 2,
                                                          args.data) + ["--fsdp"], 2)]
        for label, argv, processes in runs:  # each process one thread: two processes fill the 2 cores
            wall, peaks = measured(argv, {**env, "OMP_NUM_THREADS": str(2 // processes)})
            out = Path(argv[argv.index("-o") + 1])
            pre = json.loads((out / "manifest.json").read_text())["results"]["preflight"]
            rows.append({"run": label, "peak_rss_mb_per_process": [round(p) for p in peaks[:processes]],
                         "state_mb_per_process": pre["sharded_state_mb"] if "fsdp" in label else pre["state_mb"],
                         "curve": curve(out), "wall_s": round(wall, 1)})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
    base = rows[0]["curve"]
    print(markdown([{"run": r["run"], "peak RSS per process (MB)": " / ".join(map(str, r["peak_rss_mb_per_process"])),
                     "weights + grads + AdamW per process (MB)": r["state_mb_per_process"],
                     "loss vs 1 process (max rel. diff)": f"{max(abs(a - b) / abs(b) for a, b in zip(r['curve'], base)):.2e}",
                     "wall (s)": r["wall_s"]} for r in rows]))

if __name__ == "__main__":
    main()
