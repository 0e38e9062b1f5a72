"""Sentence-pair data for embedding losses (`--text_pair_field`): two text columns and a 0/1 label.

A pair is stored as one row, both texts' tokens end to end in `input_ids` plus where the first ends,
so everything that measures rows by `input_ids` (the pre-flight estimate, length grouping, tokens
seen) counts both texts without knowing about pairs. The collator splits them again: the model
encodes each text on its own, and the loss compares the two pooled embeddings.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from datasets import Dataset

from slmops.options.finetune_options import FinetuneOptions
from slmops.data.prepare import PreparedData, data_checks, drop_empty
from slmops.data.sources import hold_out, load_split
from slmops.errors import UsageError

log = logging.getLogger(__name__)

UNLIMITED = 10**6  # tokenizers without a length limit report a huge model_max_length


def prepare_pairs(cfg: FinetuneOptions, tokenizer: Any) -> PreparedData:
    """The pair counterpart of `prepare_data`: splits, tokens, labels and the manifest's summary."""
    fields = [cfg.text_field, cfg.text_pair_field, cfg.pair_label_field]
    train_rows = load_split(cfg.data_name, cfg.data_files, cfg.train_split, cfg.train_subset)
    _check_columns(fields, train_rows.column_names, cfg.train_split)
    train_rows = drop_empty(train_rows, fields, cfg.train_split)
    if cfg.max_samples:
        train_rows = train_rows.select(range(min(cfg.max_samples, len(train_rows))))
    if cfg.eval_split:
        eval_rows = load_split(cfg.data_name, cfg.data_files, cfg.eval_split, cfg.eval_subset or cfg.train_subset)
        _check_columns(fields, eval_rows.column_names, cfg.eval_split)
        eval_rows = drop_empty(eval_rows, fields, cfg.eval_split)
    else:
        fraction = min(cfg.eval_fraction, cfg.max_eval_samples / len(train_rows))
        train_rows, eval_rows = hold_out(train_rows, fraction, cfg.seed, train_rows[cfg.pair_label_field])

    limit = tokenizer.model_max_length if tokenizer.model_max_length < UNLIMITED else cfg.max_seq_len
    max_len = min(cfg.max_seq_len, limit)
    stats: dict[str, Any] = {"max_seq_len": max_len}
    fingerprint = hashlib.sha256()
    splits, texts = {}, {}
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        labels = [_label(v, i, cfg.pair_label_field) for i, v in enumerate(rows[cfg.pair_label_field])]
        firsts, seconds = list(rows[cfg.text_field]), list(rows[cfg.text_pair_field])
        first, cut_first = _tokenize(firsts, tokenizer, max_len)
        second, cut_second = _tokenize(seconds, tokenizer, max_len)
        texts[name] = [f"{a}\t{b}" for a, b in zip(firsts, seconds)]
        for text, label in zip(texts[name], labels):
            fingerprint.update(f"{text}\t{label:g}\0".encode())
        truncated = sum(a or b for a, b in zip(cut_first, cut_second))
        splits[name] = Dataset.from_dict({"input_ids": [a + b for a, b in zip(first, second)],
                                          "first_length": [len(a) for a in first], "labels": labels})
        tokens = sum(len(a) + len(b) for a, b in zip(first, second))
        stats[name] = {"rows": len(labels), "truncated": truncated, "dropped": 0, "tokens": tokens}
        log.info("%s: %d pairs, %d tokens", name, len(labels), tokens)
        if truncated:
            log.warning("%s: %d of %d pairs had a text longer than %d tokens, truncated", name, truncated,
                        len(labels), max_len)
    stats["fingerprint"] = fingerprint.hexdigest()
    stats["checks"] = data_checks(texts, splits["train"]["labels"])
    return PreparedData(splits["train"], splits["eval"], stats)


class PairCollator:
    """A batch of n pairs as 2n padded rows: rows [0, n) the first texts, [n, 2n) the second, `labels`
    the n pair labels. `skip_logits` asks a causal LM for no vocabulary logits at all (an all-False
    `logits_to_keep`): the pair losses read hidden states, and a 49k-wide head over every position
    would cost more than the rest of the step."""

    def __init__(self, pad_token_id: int, skip_logits: bool):
        self.pad_token_id = pad_token_id
        self.skip_logits = skip_logits

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = ([r["input_ids"][: r["first_length"]] for r in rows]
                 + [r["input_ids"][r["first_length"]:] for r in rows])
        width = max(len(t) for t in texts)
        ids = torch.full((len(texts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), width), dtype=torch.long)
        for i, t in enumerate(texts):
            ids[i, : len(t)] = torch.as_tensor(t)
            mask[i, : len(t)] = 1
        batch = {"input_ids": ids, "attention_mask": mask,
                 "labels": torch.tensor([float(r["labels"]) for r in rows])}
        if self.skip_logits:
            batch["logits_to_keep"] = torch.zeros_like(ids, dtype=torch.bool)
        return batch


def _check_columns(fields: list[str], columns: list[str], split: str) -> None:
    missing = [f for f in fields if f not in columns]
    if missing:
        raise UsageError(f"split {split!r} lacks column(s) {', '.join(missing)} (from --text_field, "
                         f"--text_pair_field, --pair_label_field); fields present: {', '.join(columns)}")


def _label(value: Any, row: int, field: str) -> float:
    """1 for a similar pair, 0 for a dissimilar one; anything else is a data error worth one line."""
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return float(value.strip().lower() in ("1", "true"))
    if isinstance(value, (bool, int, float)) and float(value) in (0.0, 1.0):
        return float(value)
    raise UsageError(f"--pair_label_field {field}: row {row} has {value!r}; a pair label is 1 (similar) "
                     f"or 0 (dissimilar)")


def _tokenize(texts: list[str], tokenizer: Any, max_len: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids with the tokenizer's own special tokens (an encoder's [CLS] ... [SEP]), cut at `max_len`
    by the tokenizer so an end marker survives; and which texts were cut."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    cut = [len(x) > max_len for x in ids]
    if any(cut):
        long = [t for t, c in zip(texts, cut) if c]
        shortened = iter(tokenizer(long, add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"])
        ids = [next(shortened) if c else x for x, c in zip(ids, cut)]
    return ids, cut
