"""Time to accuracy on SST-2: SmolLM2-135M-Instruct fine-tuned with LoRA under a few recipes, each
timed as a user runs it (the whole `slmops finetune` process) and scored on the 872 dev rows by the
independent scorer (benchmarks/sst2_accuracy.py: plain transformers + peft, label-word scores).

One recipe after another on a quiet machine; prints a markdown table. The first row is the README's
quickstart; "15000 rows" (about 10 minutes) shows where more data stops paying and is run only when
named.

    python benchmarks/time_to_accuracy.py
    python benchmarks/time_to_accuracy.py --only "15000 rows, batch 64"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from sst2_accuracy import accuracy, load
from tables import markdown

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "<|im_start|>user\n{phrase}<|im_end|>\n<|im_start|>assistant\n{tone}<|im_end|>"


class Recipe(NamedTuple):
    rows: int        # training rows taken (10% of them, at most 1,000, held out for validation)
    lr: float
    epochs: int
    rank: int        # LoRA rank
    batch: int
    validate: bool   # evaluations during training


RECIPES = {
    "quickstart": Recipe(2000, 1e-3, 1, 16, 16, True),
    "lr 2e-4 (the default)": Recipe(2000, 2e-4, 1, 16, 16, True),
    "lr 1e-3, no validation": Recipe(2000, 1e-3, 1, 16, 16, False),
    "lr 2e-3": Recipe(2000, 2e-3, 1, 16, 16, True),
    "lr 1e-3, rank 8": Recipe(2000, 1e-3, 1, 8, 16, True),
    "1000 rows, lr 1e-3": Recipe(1000, 1e-3, 1, 16, 16, True),
    "4000 rows, lr 1e-3": Recipe(4000, 1e-3, 1, 16, 16, True),
    "2400 rows, batch 32, lr 1e-3": Recipe(2400, 1e-3, 1, 16, 32, True),
    "2800 rows, batch 64, lr 1e-3": Recipe(2800, 1e-3, 1, 16, 64, True),
    "2800 rows, batch 64, lr 2e-3": Recipe(2800, 2e-3, 1, 16, 64, True),
    "2800 rows, batch 64, lr 2e-3, no validation": Recipe(2800, 2e-3, 1, 16, 64, False),
}
LONG = {"15000 rows, batch 64": Recipe(16000, 1e-3, 1, 16, 64, True)}  # 1,000 of the 16,000 held out


def train(out: Path, data: str, r: Recipe) -> float:
    argv = [sys.executable, "-m", "slmops", "finetune", "-m", "smollm2-135m-instruct", "-d", data,
            "--train_split", f"train[:{r.rows}]", "--text_template", TEMPLATE, "--method", "lora",
            "--lora_r", str(r.rank), "--num_train_epochs", str(r.epochs), "--per_device_train_batch_size", str(r.batch),
            "--lr_scheduler_type", "cosine", "--learning_rate", str(r.lr), "--output_path", str(out),
            "--log_level", "3"]
    if not r.validate:
        argv += ["--eval_strategy", "no"]
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
        for name, recipe in {**RECIPES, **LONG}.items():
            if (args.only and name not in args.only) or (not args.only and name in LONG):
                continue
            out = Path(tmp) / name.replace(" ", "_").replace(",", "")
            seconds = train(out, str(Path(args.data) / "train.jsonl"), recipe)
            tok, model = load(base, str(out / "adapter"))
            score = accuracy(tok, model.merge_and_unload(), dev, batch_size=64)
            results = json.loads((out / "manifest.json").read_text())["results"]
            timing = results["timing"]
            rows.append({"recipe": name, "rows taken": recipe.rows, "learning rate": f"{recipe.lr:g}",
                         "rank": recipe.rank, "batch": recipe.batch, "whole process (s)": round(seconds, 1),
                         "training (s)": timing["training"], "validation (s)": timing.get("evaluation", 0),
                         "dev accuracy": f"{100 * score:.2f}%"})
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))

if __name__ == "__main__":
    main()
