"""Fine-tuning beside other work: the README recipe on a few SST-2 rows on a quiet machine, then beside a
process that keeps one core busy, with the threads slmops chooses and with one thread per core forced.

    python benchmarks/shared_machine.py --data ../shared/data/sst2/train.jsonl --work runs/shared
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

TEMPLATE = "<|im_start|>user\\n{phrase}<|im_end|>\\n<|im_start|>assistant\\n{tone}<|im_end|>"


def finetune(args: argparse.Namespace, name: str, *extra: str) -> dict:
    out = Path(args.work) / name
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "slmops", "finetune", "-m", args.model, "-d", args.data, "--train_split",
                    f"train[:{args.rows}]", "--text_template", TEMPLATE, "--max_steps", str(args.steps),
                    "--per_device_train_batch_size", "16", "--eval_on_start", "false", "--log_level", "3",
                    "-o", str(out), *extra], check=True, stdout=subprocess.DEVNULL)
    manifest = json.loads((out / "manifest.json").read_text())
    results = manifest["results"]
    return {"run": name, "threads": manifest["resolved"]["cpu_threads"], "training_s": results["timing"]["training"],
            "tokens_per_second": results["tokens_per_second"], "wall_s": results["wall_time_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="SST-2 train.jsonl")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=240)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--work", default="runs/shared")
    args = ap.parse_args()
    rows = [finetune(args, "quiet")]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1)
        rows += [finetune(args, "one core busy"), finetune(args, "one core busy, forced", "--num_threads", "2")]
    finally:
        busy.kill()
    quiet = rows[0]["training_s"]
    print("| machine | threads (why) | training | vs quiet | tokens/s | whole run |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['threads']['threads']} ({r['threads']['why']}) | {r['training_s']:.2f} s | "
              f"{r['training_s'] / quiet:.2f}x | {r['tokens_per_second']:.0f} | {r['wall_s']:.1f} s |")


if __name__ == "__main__":
    main()
