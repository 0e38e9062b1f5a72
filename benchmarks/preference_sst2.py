"""SFT then DPO against SFT alone on SST-2 (SmolLM2-135M-Instruct): dev accuracy, mean label margin, wall time.

The preference set is derived from SST-2's own rows: for each phrase the right tone is chosen and the other
rejected. SFT learns from the first --sft_rows training rows; DPO goes on from that adapter over the next
--dpo_rows rows as pairs. A third run, SFT on both slices, says what the same rows give without DPO. Every
run is the `slmops finetune` command a user types; the scores come from benchmarks/sst2_accuracy.py's
plain transformers + peft scorer over the 872 dev rows: accuracy (the better-scored label word after the
prompt) and the mean margin log p(right label) - log p(wrong label) at that position.

    python benchmarks/preference_sst2.py --out /tmp/pref-sst2      # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sst2_accuracy import LABELS, PROMPT, label_ids, load, read_rows  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"
TEMPLATE = "<|im_start|>user\n{phrase}<|im_end|>\n<|im_start|>assistant\n{tone}<|im_end|>"
RUN = ["--model_name_or_path", "smollm2-135m-instruct", "--num_train_epochs", "1",
       "--per_device_train_batch_size", "16", "--lr_scheduler_type", "cosine", "--overwrite"]


def slmops(*args: str) -> float:
    """Run `slmops ARGS` (the installed command) and return its wall time."""
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("slmops")), *args], check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def pairs(rows: list[dict], path: Path) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            other = "negative" if r["tone"] == "positive" else "positive"
            fh.write(json.dumps({"prompt": PROMPT.format(**r), "chosen": r["tone"], "rejected": other}) + "\n")
    return path


@torch.no_grad()
def score(base: str, adapter: str | None, rows: list[dict], batch_size: int = 32) -> tuple[float, float]:
    """(accuracy, mean margin) over `rows`."""
    tok, model = load(base, adapter)
    tok.padding_side = "left"
    ids = label_ids(tok)
    correct, margin = 0, 0.0
    for lo in range(0, len(rows), batch_size):
        batch = rows[lo: lo + batch_size]
        enc = tok([PROMPT.format(**r) for r in batch], return_tensors="pt", padding=True)
        logp = model(**enc).logits[:, -1].float().log_softmax(-1)[:, ids]
        right = torch.tensor([LABELS.index(r["tone"]) for r in batch])
        gap = logp.gather(1, right[:, None])[:, 0] - logp.gather(1, 1 - right[:, None])[:, 0]
        correct += int((gap > 0).sum())
        margin += float(gap.sum())
    return correct / len(rows), margin / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the runs")
    ap.add_argument("--sft_rows", type=int, default=300)
    ap.add_argument("--dpo_rows", type=int, default=600)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--dpo_learning_rate", type=float, default=2e-4)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train = str(DATA / "train.jsonl")
    both = a.sft_rows + a.dpo_rows
    prefs = pairs(read_rows(train, a.sft_rows, both), out / "prefs.jsonl")

    seconds = {"sft": slmops("finetune", *RUN, "-d", train, "--train_split", f"train[:{a.sft_rows}]",
                             "--text_template", TEMPLATE, "-o", str(out / "sft"))}
    seconds["dpo"] = slmops("finetune", *RUN, "--stage", "dpo", "-d", str(prefs), "--adapter_path",
                            str(out / "sft"), "--beta", str(a.beta), "--learning_rate", str(a.dpo_learning_rate),
                            "-o", str(out / "dpo"))
    seconds["sft_both"] = slmops("finetune", *RUN, "-d", train, "--train_split", f"train[:{both}]",
                                 "--text_template", TEMPLATE, "-o", str(out / "sft-both"))

    from slmops.models.catalog import resolve
    base, dev = resolve("smollm2-135m-instruct"), read_rows(str(DATA / "dev.jsonl"))
    runs = [("base model", None, None),
            (f"SFT, {a.sft_rows} rows", out / "sft" / "adapter", seconds["sft"]),
            (f"SFT {a.sft_rows} rows, then DPO {a.dpo_rows} pairs (beta {a.beta})", out / "dpo" / "adapter",
             seconds["sft"] + seconds["dpo"]),
            (f"SFT, {both} rows", out / "sft-both" / "adapter", seconds["sft_both"])]
    print("\n| model | dev accuracy | mean label margin (nats) | wall time |\n|---|---|---|---|")
    for name, adapter, wall in runs:
        acc, margin = score(base, str(adapter) if adapter else None, dev)
        print(f"| {name} | {100 * acc:.2f}% | {margin:+.3f} | {'-' if wall is None else f'{wall:.0f} s'} |",
              flush=True)


if __name__ == "__main__":
    main()
