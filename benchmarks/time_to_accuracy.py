"""Time to accuracy on SST-2: SmolLM2-135M-Instruct fine-tuned with LoRA under a few recipes, each
timed as a user runs it (the whole `slmops finetune` process) and scored on the 872 dev rows by the
independent scorer (benchmarks/sst2_accuracy.py: plain transformers + peft, label-word scores).

One recipe after another on a quiet machine; prints a markdown table. The first row is the README's
quickstart.

    python benchmarks/time_to_accuracy.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sst2_accuracy import accuracy, load
from tables import markdown

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "<|im_start|>user\n{phrase}<|im_end|>\n<|im_start|>assistant\n{tone}<|im_end|>"
# name: (training rows taken, learning rate, epochs, LoRA rank)
RECIPES = {"quickstart": (2000, 2e-4, 1, 16), "lr 1e-3": (2000, 1e-3, 1, 16), "1000 rows, lr 1e-3": (1000, 1e-3, 1, 16),
           "4000 rows, lr 1e-3": (4000, 1e-3, 1, 16), "lr 1e-3, rank 8": (2000, 1e-3, 1, 8)}


def train(out: Path, data: str, rows: int, lr: float, epochs: int, rank: int) -> float:
    argv = [sys.executable, "-m", "slmops", "finetune", "-m", "smollm2-135m-instruct", "-d", data,
            "--train_split", f"train[:{rows}]", "--text_template", TEMPLATE, "--method", "lora", "--lora_r", str(rank),
            "--num_train_epochs", str(epochs), "--per_device_train_batch_size", "16", "--lr_scheduler_type",
            "cosine", "--learning_rate", str(lr), "--output_path", str(out), "--log_level", "3"]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{out.name}: {done.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    ap.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    args = ap.parse_args()
    dev = [json.loads(line) for line in (Path(args.data) / "dev.jsonl").read_text().splitlines()]
    base = str(Path("~/.cache/slmops/models/smollm2-135m-instruct").expanduser())
    rows = []
    with tempfile.TemporaryDirectory(prefix="slmops-tta-") as tmp:
        for name, (n, lr, epochs, rank) in RECIPES.items():
            if args.only and name not in args.only:
                continue
            out = Path(tmp) / name.replace(" ", "_").replace(",", "")
            seconds = train(out, str(Path(args.data) / "train.jsonl"), n, lr, epochs, rank)
            tok, model = load(base, str(out / "adapter"))
            score = accuracy(tok, model.merge_and_unload(), dev, batch_size=64)
            results = json.loads((out / "manifest.json").read_text())["results"]
            rows.append((name, n, lr, epochs, rank, round(seconds, 1), results["timing"]["training"], score))
            print(json.dumps(rows[-1]), flush=True)
    print(markdown([{"recipe": name, "rows": n, "learning rate": f"{lr:g}", "epochs": epochs, "rank": rank,
                     "whole process (s)": seconds, "training (s)": training, "dev accuracy": f"{100 * score:.2f}%"}
                    for name, n, lr, epochs, rank, seconds, training, score in rows]))

if __name__ == "__main__":
    main()
