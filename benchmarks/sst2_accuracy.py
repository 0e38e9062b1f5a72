"""Score an adapter on held-out SST-2 with plain transformers + peft, or an exported ONNX folder with plain
onnxruntime-genai (no slmops code either way).

Accuracy compares the next-token scores of the two label words after the prompt, the way the
reference recipe in ../shared/data/sst2/README.md measures it. `--val_data` adds the validation
loss: mean cross-entropy over the answer tokens (`{tone}<|im_end|>`), the loss every recipe trains on.

    python benchmarks/sst2_accuracy.py --base ~/.cache/slmops/models/smollm2-135m-instruct \
        --adapter runs/sst2-lora/adapter --data ../shared/data/sst2/dev.jsonl
    python benchmarks/sst2_accuracy.py --onnx runs/sst2-int4 --data ../shared/data/sst2/dev.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "<|im_start|>user\n{phrase}<|im_end|>\n<|im_start|>assistant\n"
ANSWER = "{tone}<|im_end|>"
LABELS = ["negative", "positive"]


def load(base: str, adapter: str | None):
    tok = AutoTokenizer.from_pretrained(base)  # adapters need not carry the tokenizer (Olive's do not)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    return tok, model.eval()


def label_ids(tok) -> list[int]:
    """Each label word's first token: accuracy compares these two next-token scores after the prompt."""
    return [tok(w, add_special_tokens=False)["input_ids"][0] for w in LABELS]


def predicted(last, ids: list[int]) -> str:
    """The label whose token scores higher in one position's logits (a tie: the first label, as argmax)."""
    return LABELS[int(last[ids[1]] > last[ids[0]])]


@torch.no_grad()
def accuracy(tok, model, rows: list[dict], batch_size: int = 32) -> float:
    tok.padding_side = "left"
    ids = label_ids(tok)
    correct = 0
    for lo in range(0, len(rows), batch_size):
        batch = rows[lo: lo + batch_size]
        enc = tok([PROMPT.format(**r) for r in batch], return_tensors="pt", padding=True)
        pred = model(**enc).logits[:, -1, ids].argmax(-1).tolist()
        correct += sum(LABELS[p] == r["tone"] for p, r in zip(pred, batch))
    return correct / len(rows)


def onnx_accuracy(folder: str, rows: list[dict]) -> float:
    """The same comparison through onnxruntime-genai, one row at a time (its logits call takes no batch)."""
    import onnxruntime_genai as og

    tok, model = AutoTokenizer.from_pretrained(folder), og.Model(folder)
    labels = label_ids(tok)
    correct = 0
    for r in rows:
        ids = tok(PROMPT.format(**r))["input_ids"]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids))
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        correct += predicted(generator.get_output("logits")[0, -1], labels) == r["tone"]
    return correct / len(rows)


@torch.no_grad()
def answer_loss(tok, model, rows: list[dict]) -> float:
    """Mean cross-entropy per answer token, one row at a time (no padding to get wrong)."""
    total, count = 0.0, 0
    for r in rows:
        prompt = tok(PROMPT.format(**r), add_special_tokens=False)["input_ids"]
        answer = tok(ANSWER.format(**r), add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1: -1]
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum").item()
        count += len(answer)
    return total / count


def read_rows(path: str, start: int = 0, stop: int | None = None) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh][start:stop]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="the PyTorch model folder")
    ap.add_argument("--adapter")
    ap.add_argument("--onnx", help="an exported ONNX Runtime GenAI folder, scored instead of --base")
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--val_data", help="JSONL rows for the validation loss")
    ap.add_argument("--batch_size", type=int, default=32)
    args = ap.parse_args()

    if not (args.base or args.onnx):
        ap.error("give --base (PyTorch) or --onnx (an exported folder)")
    if args.onnx and args.val_data:
        ap.error("--val_data scores a PyTorch model: give --base instead of --onnx")
    rows = read_rows(args.data, 0, args.limit)
    start = time.perf_counter()
    if args.onnx:
        acc, what = onnx_accuracy(args.onnx, rows), f"onnx {args.onnx}"
    else:
        tok, model = load(args.base, args.adapter)
        acc = accuracy(tok, model, rows, args.batch_size)
        what = f"adapter {args.adapter}" if args.adapter else "base only"
    print(f"accuracy {acc:.4f} ({round(acc * len(rows))}/{len(rows)}) in {time.perf_counter() - start:.0f} s [{what}]")
    if args.val_data:
        print(f"validation loss {answer_loss(tok, model, read_rows(args.val_data)):.4f}")


if __name__ == "__main__":
    main()
