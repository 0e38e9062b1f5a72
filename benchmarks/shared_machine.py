"""Fine-tuning beside other work: the README recipe on a few SST-2 rows on a quiet machine, then beside a
process that keeps one core busy (from the start, or from `--late` seconds into the run), with the
threads slmops chooses and follows and with one thread per core forced. `--plain` adds the plain
Trainer + peft recipe (benchmarks/plain_recipe.py) on the same rows, quiet and beside the busy core
(one epoch of `--rows`: give `--steps` = rows / 16 for the same work).

    python benchmarks/shared_machine.py --data ../shared/data/sst2/train.jsonl --work runs/shared [--plain]
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
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


def plain(args: argparse.Namespace, name: str) -> dict:
    """The plain recipe on the same rows, run as finetune_speed.py runs it (bf16 where slmops trains in bf16)."""
    from finetune_speed import run_plain
    from step_timing import resolve_model_and_precision

    from slmops.models.catalog import resolve

    model, precision = resolve_model_and_precision(resolve(args.model), "auto")
    out = Path(args.work) / name
    shutil.rmtree(out, ignore_errors=True)
    cmd, _, _ = run_plain(argparse.Namespace(model=model, data=args.data, rows=args.rows, precision=precision), out, 42)
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"run": name, "threads": {"threads": "torch's default", "why": "one per core"},
            "training_s": result["train_runtime_s"], "tokens_per_second": result["tokens_per_second"],
            "wall_s": time.perf_counter() - start}


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
    ap.add_argument("--plain", action="store_true", help="also the plain Trainer + peft recipe, quiet and busy")
    ap.add_argument("--forced", action=argparse.BooleanOptionalAction, default=True,
                    help="also the runs with one thread per core forced (--num_threads 2; ~6 minutes each when busy)")
    args = ap.parse_args()
    forced = [("--num_threads", "2")] if args.forced else []
    rows = [finetune(args, "quiet")]
    with busy_core(1):
        rows += [finetune(args, "one core busy")] + [finetune(args, "one core busy, forced", *f) for f in forced]
    for name, extra in [("busy from mid-run", ())] + [("busy from mid-run, forced", f) for f in forced]:
        with busy_core(args.late):
            rows.append(finetune(args, name, *extra))
    if args.plain:
        rows.append(plain(args, "plain recipe, quiet"))
        with busy_core(1):
            rows.append(plain(args, "plain recipe, one core busy"))
    quiet = {r["run"]: r["training_s"] for r in rows if "quiet" in r["run"]}
    print("| machine | threads (why) | training | vs quiet | tokens/s | whole run | changes [step, threads] |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['threads']['threads']} ({r['threads']['why']}) | {r['training_s']:.2f} s | "
              f"{r['training_s'] / quiet['plain recipe, quiet' if r['run'].startswith('plain') else 'quiet']:.2f}x | "
              f"{r['tokens_per_second']:.0f} | "
              f"{r['wall_s']:.1f} s | "
              f"{r['threads'].get('changes') or '-'} |")


if __name__ == "__main__":
    main()
