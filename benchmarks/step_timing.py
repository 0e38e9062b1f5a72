"""slmops's LoRA training step alone on this machine: where its time goes, and how it grows.

The step is the one `slmops finetune` runs on a CPU (rows packed, attention row by row, the fast LoRA
layers, the vocabulary head and the last MLP only at supervised positions), with the speed benchmark's
recipe (LoRA r16/alpha 32/dropout 0.05 on all linear layers, AdamW), the base in `--precision` under
autocast.

- `--profile`: real SST-2 batches of 16 rows (the recipe's) and of 64, in turn (10 of each after 2 of
  warm-up; medians). Step time, real tokens and MFU at each; the line through the two splits a step into
  a fixed part (what does not grow with the tokens: operator calls on short rows, the optimizer) and a
  part per token, and the marginal MFU is the utilisation of that per-token part: what a step would
  reach if its fixed part cost nothing. Then the operator self time of 16-row steps by kind (torch
  profiler; its shape recording slows the step by ~10%, so read the shares, not the milliseconds).
- `--scale`: step time at 2,048 tokens a step as 16x128, 4x512 and 1x2048, for SmolLM2-135M and a
  360M Llama-shaped config (random weights).

    python benchmarks/step_timing.py --profile --scale

MFU counts the FLOPs the loss needs (4 x frozen linear weights + 6 x LoRA weights per token, attention at
each token's context, the vocabulary head only at supervised positions) against the matmul peak of the
precision at the model's own shapes (`model_peak`: its projections at a 16-row batch's tokens), measured
here at start.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
import sst2_accuracy as scorer  # noqa: E402
from tables import markdown  # noqa: E402

HERE = Path(__file__).resolve().parent
RECIPE = dict(r=16, alpha=32, dropout=0.05, batch=16, lr=2e-4)


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    """Best GFLOP/s of an n^3 matmul over a few seconds (the best, as noise only slows it)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def peaks() -> dict[str, float]:
    """The square-matmul peak of each precision here (bf16 at 512^3: as fast as 2048^3 where bf16 is native,
    and quick where it is emulated)."""
    return {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16, 512, 2.0)}


def model_peak(model_path: str, precision: str, tokens: int = 385, seconds: float = 5.0) -> float:
    """GFLOP/s of the model's own frozen matmuls at the tokens of a 16-row SST-2 batch: every layer's
    projections forward (x W^T) and for the input gradient (g W), each layer with its own weights as in a
    step; the best pass over a few seconds. MFU is stated against this: what the matmul kernels reach at
    these shapes on this machine, which at a few hundred rows is below the square-matmul peak."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, precision)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    shapes = [(m.out_features, m.in_features) for n, m in meta.named_modules()
              if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    weights = [torch.randn(shape, dtype=dtype) for shape in shapes]
    inputs = {n: torch.randn(tokens, n, dtype=dtype) for n in {d for shape in shapes for d in shape}}
    work = sum(4 * tokens * out_f * in_f for out_f, in_f in shapes)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for w in weights:
            inputs[w.shape[1]] @ w.t()
            inputs[w.shape[0]] @ w
        best = max(best, work / (time.perf_counter() - t) / 1e9)
    return best


def sst2_examples(tok, rows: list[dict]) -> list[dict]:
    """Rows as the collator takes them: prompt and answer tokens, the loss on the answer only."""
    examples = []
    for r in rows:
        prompt = tok(scorer.PROMPT.format(**r), add_special_tokens=False)["input_ids"]
        answer = tok(scorer.ANSWER.format(**r), add_special_tokens=False)["input_ids"]
        examples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return examples


def flops_per_row(model_path: str, rows: list[dict]) -> tuple[list[int], list[float]]:
    """Real tokens and loss-relevant training FLOPs of each row (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    frozen = sum(m.weight.numel() for m in linears)
    lora = sum(RECIPE["r"] * (m.in_features + m.out_features) for m in linears)
    head = cfg.vocab_size * cfg.hidden_size
    attn = cfg.num_hidden_layers * cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size //
                                                                      cfg.num_attention_heads)
    tokens, flops = [], []
    for example in sst2_examples(tok, rows):
        n = len(example["input_ids"])
        answer = sum(label != -100 for label in example["labels"])
        context = n * (n + 1) / 2  # sum over tokens of the positions each attends to
        tokens.append(n)
        flops.append(n * (4 * frozen + 6 * lora) + 3 * 4 * attn * context + 4 * head * answer)
    return tokens, flops


def lora_trainer(model: torch.nn.Module, dtype: torch.dtype, pad_token_id: int = 0) -> tuple[Callable, Callable]:
    """A function that trains `model` on one batch as `slmops finetune` does on a CPU and returns the step's
    seconds, and the collator that makes those batches: the product's own set-up (`attach_method`: LoRA
    with row-by-row attention and the fused adapter layers; `speed_up`: packing, logits only where a label
    is supervised, the last MLP likewise), with the recipe's settings."""
    from slmops.options.finetune_options import FinetuneOptions
    from slmops.training.model_setup import attach_method
    from slmops.training.speed import speed_up
    from slmops.training.speed.logits import causal_lm_loss

    opts = FinetuneOptions.build(model_name_or_path="-", text_field="text", output_path="-", lora_r=RECIPE["r"],
                                 lora_alpha=RECIPE["alpha"], lora_dropout=RECIPE["dropout"])
    model.config.use_cache = False
    model, _ = attach_method(model, opts, encoder=False, gpu=False)
    batching = speed_up(model, opts.packing, opts.share_prefix, True, False, pad_token_id)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=RECIPE["lr"], fused=True)

    def step(batch: dict) -> float:
        batch = dict(batch)
        labels = batch.pop("labels")
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = causal_lm_loss(model(**batch), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t
    return step, batching.collator


def scale_section(model_path: str, precision: str) -> list[dict]:
    """Step time at 2,048 tokens a step as 16x128, 4x512 and 1x2048, for SmolLM2-135M's config and a
    360M Llama-shaped one, random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    small = AutoConfig.from_pretrained(model_path)
    big = AutoConfig.from_pretrained(model_path)
    big.update(dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                    num_key_value_heads=5, head_dim=64))
    dtype = getattr(torch, precision)
    table = []
    for name, cfg in (("135M", small), ("360M", big)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        params = sum(p.numel() for p in model.parameters())
        step, collate = lora_trainer(model, dtype)
        for length in (128, 512, 2048):
            rows = [{"input_ids": torch.randint(0, cfg.vocab_size, (length,)).tolist()} for _ in range(2048 // length)]
            for r in rows:
                r["labels"] = [-100] * (length - 2) + r["input_ids"][-2:]
            batch = collate(rows)
            seconds = min([step(batch) for _ in range(3)][1:])  # the first is warm-up
            table.append({"model": f"{name} ({params / 1e6:.0f}M)", "rows x tokens": f"{len(rows)} x {length}",
                          "precision": precision, "s/step": round(seconds, 2),
                          "tokens/s": round(2048 / seconds, 1)})
            print(table[-1], flush=True)
    return table


# operator kinds of the profile: matmuls by their operands' shapes, the rest by name
MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")
DROPOUT = ("aten::uniform_", "aten::log1p_", "aten::ceil_", "aten::clamp_min_", "aten::cumsum_",
           "aten::searchsorted", "aten::index_fill", "aten::index_fill_", "aten::take", "aten::index_copy_")


def op_kind(name: str, shapes: list, vocab: int) -> str:
    if name in MATMULS:
        dims = {d for shape in shapes for d in (shape or ())}
        return ("adapter matmuls" if RECIPE["r"] in dims else "vocabulary head" if vocab in dims
                else "frozen matmuls")
    if "scaled_dot_product" in name:
        return "attention"
    if name in DROPOUT:
        return "adapter dropout"
    if name in ("aten::copy_", "aten::_to_copy"):
        return "casts and copies"
    if "adam" in name.lower():
        return "optimizer"
    return "everything else"


def profile_section(model_path: str, precision: str, peak: float, data: str) -> dict:
    """See the module docstring: steps of 16 and 64 real rows, the line through them, operators by kind."""
    from torch.profiler import profile
    from transformers import AutoTokenizer

    from slmops.models.loading import load_model
    from slmops.training.speed.memory import keep_freed_memory

    dtype = getattr(torch, precision)
    tok = AutoTokenizer.from_pretrained(model_path)
    rows = scorer.read_rows(data, 0, 64 * 12)
    examples = sst2_examples(tok, rows)
    _, flops = flops_per_row(model_path, rows)
    keep_freed_memory()
    torch.manual_seed(0)
    model = load_model(model_path, dtype, False)
    vocab = model.config.vocab_size
    step, collate = lora_trainer(model, dtype, tok.pad_token_id)

    def batches(size: int, count: int) -> list[tuple[dict, int, float]]:
        """`count` batches of `size` rows: collated, their real tokens and their FLOPs."""
        spans = [range(i * size, (i + 1) * size) for i in range(count)]
        return [(collate([examples[j] for j in s]), sum(len(examples[j]["input_ids"]) for j in s),
                 sum(flops[j] for j in s)) for s in spans]

    # 16- and 64-row steps taken in turn, so that the machine's drift moves both alike; medians
    plans = {size: batches(size, 12) for size in (16, 64)}
    runs: dict[int, list[tuple[float, int, float]]] = {16: [], 64: []}
    for i in range(12):
        for size, plan in plans.items():
            batch, tokens, work = plan[i]
            seconds = step(batch)
            if i >= 2:  # two of warm-up
                runs[size].append((seconds, tokens, work))
    measured = {size: tuple(statistics.median(r[k] for r in rs) for k in range(3)) for size, rs in runs.items()}
    table = [{"rows a step": size, "real tokens a step": round(n), "ms a step": round(1000 * t),
              "tokens/s": round(n / t), "MFU": f"{100 * work / t / 1e9 / peak:.0f}%"}
             for size, (t, n, work) in measured.items()]
    (t16, n16, f16), (t64, n64, f64) = measured[16], measured[64]
    per_token = (t64 - t16) / (n64 - n16)
    fixed = t16 - per_token * n16
    line = {"fixed ms a step": round(1000 * fixed), "ms a token": round(1000 * per_token, 3),
            "fixed share at 16 rows": f"{100 * fixed / t16:.0f}%",
            "marginal MFU": f"{100 * (f64 - f16) / (t64 - t16) / 1e9 / peak:.0f}%"}

    plan = batches(16, 6)
    with profile(record_shapes=True) as prof:
        for batch, _, _ in plan:
            step(batch)
    by_kind: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        kind = op_kind(event.key, event.input_shapes, vocab)
        by_kind[kind] = by_kind.get(kind, 0.0) + event.self_cpu_time_total / 1e3 / len(plan)
    total = sum(by_kind.values())
    kinds = [{"operators": kind, "ms a step": round(ms), "share": f"{100 * ms / total:.0f}%"}
             for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    return {"steps": table, "line": [line], "operators": kinds}


def resolve_model_and_precision(model: str | None, precision: str) -> tuple[str, str]:
    """The default model's folder, and "auto" made bf16 where the CPU (or a GPU) has it natively."""
    if model is None:
        from slmops.models.catalog import resolve
        model = resolve("smollm2-135m-instruct")
    if precision == "auto":
        from slmops.artifacts.machine import native_bf16
        precision = "bfloat16" if native_bf16() or torch.cuda.is_available() else "float32"
    return model, precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Hugging Face folder (default: slmops's smollm2-135m-instruct)")
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared/data/sst2/train.jsonl"))
    ap.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="the base's precision (default: bfloat16 on a CPU with native bf16, else float32)")
    ap.add_argument("--profile", action="store_true", help="16- and 64-row steps, and operators by kind")
    ap.add_argument("--scale", action="store_true", help="steps at 128/512/2048 tokens, 135M and 360M")
    a = ap.parse_args()
    model, precision = resolve_model_and_precision(a.model, a.precision)
    if a.profile:
        peak = model_peak(model, precision)
        print(f"{precision} matmul peak here: {peaks()[precision]:.0f} GFLOP/s square, {peak:.0f} at the model's "
              f"own shapes (MFU against this)", flush=True)
        for title, rows in profile_section(model, precision, peak, a.data).items():
            print(f"\n{title}:\n{markdown(rows)}")
    if a.scale:
        print("\n" + markdown(scale_section(model, precision)))


if __name__ == "__main__":
    main()
