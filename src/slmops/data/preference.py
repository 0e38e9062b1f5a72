"""Preference data for `--stage dpo|orpo|kto`: rows in TRL's shape, each checked before a step is spent on it.

Pairs (DPO, ORPO) are `prompt` / `chosen` / `rejected`; unpaired answers (KTO) are `prompt` / `completion` /
`label`. Plain text stays text; with `--use_chat_template` a prompt is a message list (a string becomes one
user turn) and an answer an assistant turn, and TRL renders them with the model's template. A row that
cannot teach anything is dropped and counted: an empty side, a pair whose answers are the same, a pair whose
difference lies beyond `--max_seq_len` (the two would be trained as identical once truncated), a KTO label
that is not a yes or a no.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from typing import Any

from datasets import Dataset

from slmops.data.prepare import PreparedData
from slmops.data.sources import hold_out, load_split
from slmops.errors import UsageError
from slmops.options.finetune_options import DataOptions

log = logging.getLogger(__name__)

YES, NO = {"true", "1", "yes", "desirable"}, {"false", "0", "no", "undesirable"}
WHY = {"empty": "an empty prompt or answer", "identical": "the same chosen and rejected answer",
       "cut_by_truncation": "answers that differ only after --max_seq_len tokens",
       "bad_label": "a label that is neither true/1 nor false/0"}


def preference_fields(cfg: DataOptions) -> list[str]:
    """The columns this stage reads, in TRL's order."""
    if cfg.stage == "kto":
        return [cfg.prompt_field, cfg.completion_field, cfg.label_field]
    return [cfg.prompt_field, cfg.chosen_field, cfg.rejected_field]


def prepare_preferences(cfg: DataOptions, tokenizer: Any) -> PreparedData:
    """The train and validation splits as TRL reads them, with what was dropped and why in `stats`."""
    fields = preference_fields(cfg)
    train_rows = _columns(load_split(cfg.data_name, cfg.data_files, cfg.train_split, cfg.train_subset), fields,
                          cfg.train_split)
    if cfg.max_samples:
        train_rows = train_rows.select(range(min(cfg.max_samples, len(train_rows))))
    if cfg.eval_split:
        eval_rows = _columns(load_split(cfg.data_name, cfg.data_files, cfg.eval_split,
                                        cfg.eval_subset or cfg.train_subset), fields, cfg.eval_split)
    else:
        labels = [str(v).lower() for v in train_rows[cfg.label_field]] if cfg.stage == "kto" else None
        fraction = min(cfg.eval_fraction, cfg.max_eval_samples / len(train_rows))
        train_rows, eval_rows = hold_out(train_rows, fraction, cfg.seed, labels)
    stats: dict[str, Any] = {"stage": cfg.stage, "max_seq_len": cfg.max_seq_len}
    splits, fingerprint = {}, hashlib.sha256()
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        kept, dropped = _clean(rows, fields, cfg, tokenizer)
        for why, n in dropped.items():
            log.warning("%s: dropped %d of %d rows with %s", name, n, len(rows), WHY[why])
        if not kept:
            raise UsageError(f"no {name} rows left: of {len(rows)}, " + ", ".join(
                f"{n} had {WHY[why]}" for why, n in dropped.items()) + "; check the columns "
                f"({', '.join(fields)}) and --max_seq_len")
        log.info("%s: %d %s", name, len(kept), "answers" if cfg.stage == "kto" else "pairs")
        for row in kept:
            fingerprint.update(json.dumps(row, sort_keys=True).encode())
        splits[name] = Dataset.from_list(kept)
        stats[name] = {"rows": len(kept), "dropped": sum(dropped.values()), "dropped_why": dict(dropped)}
    stats["fingerprint"] = fingerprint.hexdigest()
    stats["checks"] = _checks(splits, cfg.stage)
    return PreparedData(splits["train"], splits["eval"], stats)


def _columns(rows: Dataset, fields: list[str], split: str) -> Dataset:
    missing = [f for f in fields if f not in rows.column_names]
    if missing:
        raise UsageError(f"split {split!r} has no column {', '.join(map(repr, missing))} (columns: "
                         f"{', '.join(rows.column_names)}); name the columns with --prompt_field, --chosen_field, "
                         f"--rejected_field (dpo, orpo) or --completion_field, --label_field (kto)")
    return rows


def _clean(rows: Dataset, fields: list[str], cfg: DataOptions, tokenizer: Any) -> tuple[list[dict], Counter]:
    kept, dropped = [], Counter()
    for raw in rows:
        prompt, first, second = (raw[f] for f in fields)
        if any(v is None or v == "" or v == [] for v in (prompt, first)) or \
                (cfg.stage != "kto" and second in (None, "", [])):
            dropped["empty"] += 1
            continue
        row = {"prompt": _turns(prompt, "user", cfg)}
        if cfg.stage == "kto":
            label = str(second).strip().lower()
            if label not in YES | NO:
                dropped["bad_label"] += 1
                continue
            row |= {"completion": _turns(first, "assistant", cfg), "label": label in YES}
        else:
            row |= {"chosen": _turns(first, "assistant", cfg), "rejected": _turns(second, "assistant", cfg)}
            if row["chosen"] == row["rejected"]:
                dropped["identical"] += 1
                continue
            if _same_once_truncated(row, tokenizer, cfg.max_seq_len):
                dropped["cut_by_truncation"] += 1
                continue
        kept.append(row)
    return kept, dropped


def _turns(value: Any, role: str, cfg: DataOptions) -> Any:
    """Text as it is; with --use_chat_template, messages (a string becomes one turn of `role`)."""
    if not cfg.use_chat_template:
        if not isinstance(value, str):
            raise UsageError(f"--stage {cfg.stage}: a column holds {type(value).__name__} values such as "
                             f"{str(value)[:60]}; message lists need --use_chat_template")
        return value
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
        raise UsageError(f"--use_chat_template: expected text or a list of {{\"role\": ..., \"content\": ...}} "
                         f"messages, got {str(value)[:80]}")
    return value


def _same_once_truncated(row: dict, tokenizer: Any, max_len: int) -> bool:
    """Whether the pair's two sequences, cut at `max_len` tokens, are the same."""
    def ids(answer: Any) -> list[int]:
        if isinstance(answer, str):
            return tokenizer(row["prompt"] + answer, add_special_tokens=False)["input_ids"][:max_len]
        return tokenizer.apply_chat_template(row["prompt"] + answer, tokenize=True, return_dict=True)[
            "input_ids"][:max_len]
    return ids(row["chosen"]) == ids(row["rejected"])


def _checks(splits: dict[str, Dataset], stage: str) -> dict[str, Any]:
    """Prompt leakage between the splits, and for KTO the balance of desirable and undesirable answers."""
    seen = {json.dumps(p) for p in splits["train"]["prompt"]}
    leaked = sum(1 for p in splits["eval"]["prompt"] if json.dumps(p) in seen)
    checks: dict[str, Any] = {"eval_prompts_in_train": leaked}
    if leaked:
        log.warning("eval: %d of %d validation prompts also appear in training: reward accuracy on them will "
                    "look better than it is; hold out other prompts", leaked, len(splits["eval"]))
    if stage == "kto":
        counts = Counter(splits["train"]["label"])
        checks["desirable"], checks["undesirable"] = counts[True], counts[False]
        if not counts[True] or not counts[False]:
            log.warning("train: every answer is %s; KTO learns from both kinds",
                        "desirable" if counts[True] else "undesirable")
    return checks
