"""Fine-tuning beside other work: the README recipe on a few SST-2 rows on a quiet machine, then beside a
process that keeps one core busy (from the start, or from `--late` seconds into the run), with the
threads slmops chooses and follows and with one thread per core forced.

    python benchmarks/shared_machine.py --data ../shared/data/sst2/train.jsonl --work runs/shared
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
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


class busy_core:
    """`python -c 'while True: pass'` from `after` seconds on, until the block ends."""

    def __init__(self, after: float):
        self.after, self.process = after, None

    def __enter__(self):
        def start():
            self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        self.timer = threading.Timer(self.after, start)
        self.timer.start()
        time.sleep(min(self.after, 1))
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        if self.process is not None:
            self.process.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="SST-2 train.jsonl")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=240)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--work", default="runs/shared")
    ap.add_argument("--late", type=float, default=10.0, help="seconds into a run the busy core starts")
    args = ap.parse_args()
    rows = [finetune(args, "quiet")]
    with busy_core(1):
        rows += [finetune(args, "one core busy"), finetune(args, "one core busy, forced", "--num_threads", "2")]
    for name, extra in (("busy from mid-run", ()), ("busy from mid-run, forced", ("--num_threads", "2"))):
        with busy_core(args.late):
            rows.append(finetune(args, name, *extra))
    quiet = rows[0]["training_s"]
    print("| machine | threads (why) | training | vs quiet | tokens/s | whole run | changes [step, threads] |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['threads']['threads']} ({r['threads']['why']}) | {r['training_s']:.2f} s | "
              f"{r['training_s'] / quiet:.2f}x | {r['tokens_per_second']:.0f} | {r['wall_s']:.1f} s | "
              f"{r['threads'].get('changes') or '-'} |")


if __name__ == "__main__":
    main()
