"""Score an adapter on held-out SST-2 with plain transformers + peft (no slmops code).

Accuracy compares the next-token scores of the two label words after the prompt, the way the
reference recipe in ../shared/data/sst2/README.md measures it.

    python benchmarks/sst2_accuracy.py --base ~/.cache/slmops/models/smollm2-135m-instruct \
        --adapter runs/sst2-lora/adapter --data ../shared/data/sst2/dev.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "<|im_start|>user\n{phrase}<|im_end|>\n<|im_start|>assistant\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--batch_size", type=int, default=32)
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.adapter or args.base)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    rows = [json.loads(line) for line in open(args.data, encoding="utf-8")][: args.limit]
    labels = ["negative", "positive"]
    label_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in labels]
    correct, start = 0, time.perf_counter()
    for lo in range(0, len(rows), args.batch_size):
        batch = rows[lo: lo + args.batch_size]
        enc = tok([PROMPT.format(**r) for r in batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**enc).logits[:, -1, label_ids]
        pred = logits.argmax(-1).tolist()
        correct += sum(labels[p] == r["tone"] for p, r in zip(pred, batch))
    print(f"accuracy {correct / len(rows):.4f} ({correct}/{len(rows)}) in {time.perf_counter() - start:.0f} s "
          f"[{'adapter ' + args.adapter if args.adapter else 'base only'}]")


if __name__ == "__main__":
    main()
