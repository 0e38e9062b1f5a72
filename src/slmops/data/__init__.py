"""Data for fine-tuning: load the splits, render them to text, tokenize with response masks."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

from slmops.config import FinetuneConfig
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


def prepare_data(cfg: FinetuneConfig, tokenizer: Any) -> PreparedData:
    """Everything between a dataset name and tensors, with a summary for the manifest."""
    train_rows = load_split(cfg.data_name, cfg.data_files, cfg.train_split, cfg.train_subset)
    formatter, needed, response_field = _formatter(cfg, tokenizer, train_rows.column_names)
    train_rows = _drop_empty(train_rows, needed, cfg.train_split)
    if cfg.max_samples:
        train_rows = train_rows.select(range(min(cfg.max_samples, len(train_rows))))
    if cfg.eval_split:
        eval_rows = load_split(cfg.data_name, cfg.data_files, cfg.eval_split, cfg.eval_subset or cfg.train_subset)
        missing = [f for f in needed if f not in eval_rows.column_names]
        if missing:
            raise UsageError(f"--eval_split {cfg.eval_split!r} lacks field(s) {', '.join(missing)}; fields present: "
                             f"{', '.join(eval_rows.column_names)}; choose a split with the training columns")
        eval_rows = _drop_empty(eval_rows, needed, cfg.eval_split)
    else:
        labels = train_rows[response_field] if response_field else None
        if labels is not None and len(set(map(str, labels))) > MAX_STRATIFY_CLASSES:
            labels = None
        # Validation loss on a thousand rows is precise enough; thousands more cost minutes per evaluation.
        fraction = min(cfg.eval_fraction, cfg.max_eval_samples / len(train_rows))
        train_rows, eval_rows = hold_out(train_rows, fraction, cfg.seed, labels)

    stats: dict[str, Any] = {"max_seq_len": cfg.max_seq_len}
    fingerprint = hashlib.sha256()
    splits = {}
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        rendered = [formatter(row) for row in rows]
        for text, _ in rendered:
            fingerprint.update(text.encode())
            fingerprint.update(b"\0")
        tok = tokenize([t for t, _ in rendered], [s for _, s in rendered], tokenizer, cfg.max_seq_len,
                       cfg.train_on_prompt, cfg.add_eos, add_special_tokens=not cfg.use_chat_template)
        _report(name, len(rows), tok, cfg.max_seq_len)
        if not tok.input_ids:
            raise UsageError(f"no {name} rows left: all {len(rows)} lost their response to truncation at "
                             f"--max_seq_len {cfg.max_seq_len}; raise --max_seq_len")
        splits[name] = Dataset.from_dict({"input_ids": tok.input_ids, "labels": tok.labels})
        stats[name] = {"rows": len(tok.input_ids), "truncated": tok.truncated, "dropped": tok.dropped,
                       "tokens": sum(map(len, tok.input_ids)),
                       "supervised_tokens": sum(sum(1 for x in lab if x != IGNORE) for lab in tok.labels)}
    stats["fingerprint"] = fingerprint.hexdigest()
    return PreparedData(splits["train"], splits["eval"], stats)


def _formatter(cfg: FinetuneConfig, tokenizer: Any, columns: list[str]) -> tuple[Formatter, list[str], str | None]:
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


def _drop_empty(rows: Dataset, fields: list[str], split: str) -> Dataset:
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
