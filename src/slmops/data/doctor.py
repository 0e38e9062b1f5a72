"""`slmops data check`: what the model will be trained on, before spending a CPU-hour on it.

Runs the same preparation as `finetune` (so the same fatal problems stop it) and prints what a
person should look at: lengths against --max_seq_len, how much of each row the loss covers, label
balance, duplicates, leakage between training and validation rows, and one rendered example.
"""

from __future__ import annotations

from typing import Any

from slmops.options.finetune_options import DataOptions
from slmops.data.preference import WHY, prepare_preferences
from slmops.data.prepare import PreparedData, prepare_data
from slmops.data.formatting import IGNORE
from slmops.models.catalog import resolve
from slmops.models.tokenizers import load_tokenizer

BAR = 40


def check(cfg: DataOptions) -> str:
    tokenizer = load_tokenizer(resolve(cfg.model_name_or_path), cfg.trust_remote_code)
    if cfg.stage != "sft":
        return preference_report(prepare_preferences(cfg, tokenizer), cfg.stage)
    data = prepare_data(cfg, tokenizer)
    return report(data, tokenizer, cfg.max_seq_len)


def preference_report(data: PreparedData, stage: str) -> str:
    """Rows kept and dropped (and why), leakage, KTO's balance, and one row as TRL will read it."""
    stats, checks = data.stats, data.stats["checks"]
    lines = []
    for name in ("train", "eval"):
        dropped = stats[name]["dropped_why"]
        lines.append(f"{name}: {stats[name]['rows']} {'answers' if stage == 'kto' else 'pairs'} kept; dropped: "
                     + (", ".join(f"{n} with {WHY[why]}" for why, n in dropped.items()) or "none"))
    lines.append(f"validation prompts also in training: {checks['eval_prompts_in_train']}")
    if stage == "kto":
        lines.append(f"desirable answers: {checks['desirable']}, undesirable: {checks['undesirable']}")
    lines += ["", "example:", *(f"  {key}: {value!r}" for key, value in data.train[0].items())]
    return "\n".join(lines)


def report(data: PreparedData, tokenizer: Any, max_seq_len: int) -> str:
    stats, checks = data.stats, data.stats["checks"]
    lines = []
    for name in ("train", "eval"):
        s = stats[name]
        kept = s["rows"] + s["dropped"]
        lines.append(f"{name}: {s['rows']} rows, {s['tokens']} tokens; {s['truncated']} truncated at "
                     f"--max_seq_len {max_seq_len} ({100 * s['truncated'] / kept:.1f}%), {s['dropped']} dropped "
                     f"with nothing to learn; the loss covers {100 * s['supervised_tokens'] / s['tokens']:.1f}% "
                     f"of the tokens")
    lines += ["", "train token lengths:", *_histogram([len(ids) for ids in data.train["input_ids"]])]
    if "label_counts" in checks:
        total = sum(checks["label_counts"].values())
        lines += ["", f"labels (imbalance {checks['label_imbalance']}:1):"]
        lines += [f"  {label!r:>14} {n:6d} {100 * n / total:5.1f}%" for label, n in checks["label_counts"].items()]
    lines += ["", f"duplicate training rows: {checks['duplicate_train_rows']}",
              f"validation rows also in training: {checks['eval_rows_in_train']}",
              "", "example (the loss covers the parts in [[...]]):", _marked(data.train[0], tokenizer)]
    return "\n".join(lines)


def _histogram(lengths: list[int]) -> list[str]:
    edges, top = [], 8
    while top < max(lengths):
        edges.append(top)
        top *= 2
    edges.append(top)
    counts = [sum(1 for n in lengths if lo < n <= hi) for lo, hi in zip([0, *edges], edges)]
    scale = max(counts) or 1
    return [f"  <= {hi:6d} {n:6d} {'#' * round(BAR * n / scale)}" for hi, n in zip(edges, counts)]


def _marked(row: dict, tokenizer: Any) -> str:
    """Decode a row, bracketing the runs of tokens the loss covers."""
    pieces, run, supervised = [], [], False
    for tid, label in zip(row["input_ids"], row["labels"]):
        if (label != IGNORE) != supervised and run:
            pieces.append(_wrap(tokenizer.decode(run), supervised))
            run = []
        supervised = label != IGNORE
        run.append(tid)
    pieces.append(_wrap(tokenizer.decode(run), supervised))
    return "".join(pieces)


def _wrap(text: str, supervised: bool) -> str:
    return f"[[{text}]]" if supervised else text
