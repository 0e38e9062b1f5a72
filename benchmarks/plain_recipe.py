"""The plain Hugging Face Trainer + peft LoRA recipe, as a baseline for slmops (no slmops code).

SST-2 phrase -> tone, LoRA r16/alpha 32/dropout 0.05 on all linear layers, loss on the answer only,
dynamic padding, lr 2e-4 cosine, batch 16, one epoch: the reference in ../shared/data/sst2/README.md.

    python benchmarks/plain_recipe.py --model ~/.cache/slmops/models/smollm2-135m-instruct \
        --data ../shared/data/sst2/train.jsonl --rows 2000 --out runs/plain
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

PROMPT = "<|im_start|>user\n{phrase}<|im_end|>\n<|im_start|>assistant\n"
ANSWER = "{tone}<|im_end|>"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(line) for line, _ in zip(open(args.data, encoding="utf-8"), range(args.rows))]
    examples = []
    for r in rows:
        prompt = tok(PROMPT.format(**r), add_special_tokens=False)["input_ids"]
        answer = tok(ANSWER.format(**r), add_special_tokens=False)["input_ids"]
        examples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        pad = lambda seq, v: seq + [v] * (width - len(seq))  # noqa: E731
        return {"input_ids": torch.tensor([pad(b["input_ids"], tok.pad_token_id) for b in batch]),
                "attention_mask": torch.tensor([pad([1] * len(b["input_ids"]), 0) for b in batch]),
                "labels": torch.tensor([pad(b["labels"], -100) for b in batch])}

    set_seed(args.seed)  # before the adapter's initialisation, as transformers' example scripts do
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    targs = TrainingArguments(output_dir=args.out, per_device_train_batch_size=16, learning_rate=2e-4,
                              lr_scheduler_type="cosine", num_train_epochs=1, logging_steps=10, save_strategy="no",
                              report_to="none", bf16=args.bf16, use_cpu=not torch.cuda.is_available(),
                              remove_unused_columns=False, include_num_input_tokens_seen="non_padding",
                              seed=args.seed)
    trainer = Trainer(model=model, args=targs, train_dataset=examples, data_collator=collate)
    result = trainer.train()
    model.save_pretrained(f"{args.out}/adapter")
    tok.save_pretrained(f"{args.out}/adapter")
    runtime = result.metrics["train_runtime"]
    print(json.dumps({"train_runtime_s": runtime, "wall_time_s": round(time.perf_counter() - start, 1),
                      "train_loss": result.training_loss,
                      "tokens_per_second": trainer.state.num_input_tokens_seen / runtime,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
