"""Training data: load the splits, render them to text, tokenize with response masks, check them."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

from slmops.options.finetune_options import DataOptions
from slmops.data.formatting import (IGNORE, Formatter, Template, Tokenized, chat_formatter,
                                    text_field_formatter, tokenize)
from slmops.data.sources import hold_out, load_split
from slmops.errors import UsageError

log = logging.getLogger(__name__)

MAX_STRATIFY_CLASSES = 20


@dataclass
class PreparedData:
    train: Dataset
    eval: Dataset
    stats: dict[str, Any] = field(default_factory=dict)


def prepare_data(cfg: DataOptions, tokenizer: Any) -> PreparedData:
    """Everything between a dataset name and tensors, with a summary for the manifest.

    Also the data doctor's checks (`slmops data check` prints them): duplicates, rows shared by
    the training and validation splits, label balance; warnings here, fatal problems raised.
    """
    train_rows = load_split(cfg.data_name, cfg.data_files, cfg.train_split, cfg.train_subset)
    formatter, needed, response_field = formatter_for(cfg, tokenizer, train_rows.column_names)
    train_rows = drop_empty(train_rows, needed, cfg.train_split)
    if cfg.max_samples:
        train_rows = train_rows.select(range(min(cfg.max_samples, len(train_rows))))
    if cfg.eval_split:
        eval_rows = load_split(cfg.data_name, cfg.data_files, cfg.eval_split, cfg.eval_subset or cfg.train_subset)
        missing = [f for f in needed if f not in eval_rows.column_names]
        if missing:
            raise UsageError(f"--eval_split {cfg.eval_split!r} lacks field(s) {', '.join(missing)}; fields present: "
                             f"{', '.join(eval_rows.column_names)}; choose a split with the training columns")
        eval_rows = drop_empty(eval_rows, needed, cfg.eval_split)
    else:
        labels = train_rows[response_field] if response_field else None
        if labels is not None and len(set(map(str, labels))) > MAX_STRATIFY_CLASSES:
            labels = None
        # Validation loss on a thousand rows is precise enough; thousands more cost minutes per evaluation.
        fraction = min(cfg.eval_fraction, cfg.max_eval_samples / len(train_rows))
        train_rows, eval_rows = hold_out(train_rows, fraction, cfg.seed, labels)

    stats: dict[str, Any] = {"max_seq_len": cfg.max_seq_len}
    fingerprint = hashlib.sha256()
    splits, texts = {}, {}
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        rendered = [formatter(row) for row in rows]
        texts[name] = [text for text, _ in rendered]
        for text in texts[name]:
            fingerprint.update(text.encode())
            fingerprint.update(b"\0")
        tok = tokenize(texts[name], [s for _, s in rendered], tokenizer, cfg.max_seq_len,
                       cfg.train_on_prompt, cfg.add_eos, add_special_tokens=not cfg.use_chat_template)
        _report(name, len(rows), tok, cfg.max_seq_len)
        if not tok.input_ids:
            raise UsageError(_nothing_to_learn(name, len(rows), tok, cfg.max_seq_len))
        splits[name] = Dataset.from_dict({"input_ids": tok.input_ids, "labels": tok.labels})
        stats[name] = {"rows": len(tok.input_ids), "truncated": tok.truncated, "dropped": tok.dropped,
                       "tokens": sum(map(len, tok.input_ids)),
                       "supervised_tokens": sum(sum(1 for x in lab if x != IGNORE) for lab in tok.labels)}
    stats["fingerprint"] = fingerprint.hexdigest()
    stats["checks"] = data_checks(texts, train_rows[response_field] if response_field else None)
    return PreparedData(splits["train"], splits["eval"], stats)


def _nothing_to_learn(name: str, rows: int, tok: Tokenized, max_len: int) -> str:
    if tok.no_response == tok.dropped:
        return (f"no {name} row has anything to learn: none of the {rows} rows renders a response (with "
                f"--use_chat_template: an assistant turn); check the data, or add --train_on_prompt")
    return (f"no {name} rows left: {tok.dropped - tok.no_response} of {rows} lost their response to truncation "
            f"at --max_seq_len {max_len}; raise --max_seq_len")


def data_checks(texts: dict[str, list[str]], labels: list | None) -> dict[str, Any]:
    """Duplicates, train/validation overlap (leakage) and label balance; warns on each problem."""
    train = Counter(texts["train"])
    duplicates = sum(n - 1 for n in train.values())
    overlap = sum(1 for t in texts["eval"] if t in train)
    checks: dict[str, Any] = {"duplicate_train_rows": duplicates, "eval_rows_in_train": overlap}
    if duplicates:
        log.warning("train: %d rows repeat an earlier row exactly (%.1f%%); they weigh more in training",
                    duplicates, 100 * duplicates / len(texts["train"]))
    if overlap:
        log.warning("eval: %d of %d validation rows also appear in the training rows: the validation loss "
                    "will look better than it is; hold out other rows", overlap, len(texts["eval"]))
    counts = Counter(map(str, labels or []))
    if counts and len(counts) <= MAX_STRATIFY_CLASSES:
        checks["label_counts"] = dict(counts.most_common())
        ratio = max(counts.values()) / min(counts.values())
        checks["label_imbalance"] = round(ratio, 2)
        if ratio >= 10:
            log.warning("train: labels are imbalanced %.0f:1 (%s); the model may learn to answer the common "
                        "label", ratio, ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    return checks


def formatter_for(cfg: DataOptions, tokenizer: Any, columns: list[str]) -> tuple[Formatter, list[str], str | None]:
    """How rows become text for these data options: (formatter, fields it needs, response field or None)."""
    if cfg.text_template:
        template = Template.parse(cfg.text_template)
        template.check_columns(columns)
        return template, list(dict.fromkeys(template.fields)), template.response_field
    name = cfg.text_field or "messages"
    if name not in columns:
        flag = "--text_field" if cfg.text_field else "--use_chat_template (messages column, set with --text_field)"
        raise UsageError(f"{flag}: column {name!r} not in the data; fields present: {', '.join(columns)}")
    if cfg.use_chat_template:
        return chat_formatter(tokenizer, name), [name], None
    return text_field_formatter(name), [name], None


def drop_empty(rows: Dataset, fields: list[str], split: str) -> Dataset:
    kept = rows.filter(lambda r: all(r[f] is not None and r[f] != "" and r[f] != [] for f in fields))
    if len(kept) < len(rows):
        log.warning("%s: dropped %d of %d rows with an empty %s", split, len(rows) - len(kept), len(rows),
                    "/".join(fields))
    if len(kept) == 0:
        raise UsageError(f"split {split!r}: no rows left after dropping rows with an empty "
                         f"{'/'.join(fields)}; check that the column holds values")
    return kept


def _report(name: str, rows: int, tok: Tokenized, max_len: int) -> None:
    log.info("%s: %d rows, %d tokens", name, len(tok.input_ids), sum(map(len, tok.input_ids)))
    if tok.truncated:
        log.warning("%s: %d of %d rows were longer than --max_seq_len %d and were truncated", name,
                    tok.truncated, rows, max_len)
    if tok.dropped:
        log.warning("%s: dropped %d rows whose response was cut away by truncation", name, tok.dropped)
