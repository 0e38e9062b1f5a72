"""Batches for causal-LM training: padding-free packing, or dynamic padding as the fallback.

Either way the collator also marks the positions whose next token is supervised (`logits_to_keep`), so the
model projects only those hidden states onto the vocabulary: with a 49k-token head and a one-word
answer, the head at every position is a fifth of the model's work spent on nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from slmops.data.formatting import IGNORE


class Collator:
    """`pack=True`: the batch's rows laid end to end in one row, positions restarting at 0 for each
    (transformers then keeps attention inside each example), so no compute goes to padding.
    `pack=False`: rows padded to the batch's longest, labels padded with -100.

    `share_prefix` (with packing): the leading tokens every row of the batch has in common and learns
    nothing from (a chat template's opening, a fixed system prompt or instruction) go in once; each row
    continues after them at the same positions and attends to them (`segmented_sdpa`). Each row's
    logits, loss and gradients are the same as with the prefix repeated.

    The examples, labels and the loss's normalisation (supervised tokens per batch) are the same
    either way: packing changes the speed, not what is learned.
    """

    def __init__(self, pad_token_id: int, pack: bool, keep_logits: bool = True, share_prefix: bool = False):
        self.pad_token_id = pad_token_id
        self.pack = pack
        self.keep_logits = keep_logits
        self.share_prefix = share_prefix

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._packed(rows) if self.pack else self._padded(rows)
        if self.keep_logits:
            keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
            keep[:, :-1] = batch["labels"][:, 1:] != IGNORE
            batch["logits_to_keep"] = keep
        return batch

    def _packed(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        shared = shared_prefix(rows) if self.share_prefix else 0
        segments = [(torch.as_tensor(r["input_ids"][shared:]), torch.as_tensor(r["labels"][shared:]),
                     torch.arange(shared, len(r["input_ids"]))) for r in rows]
        if shared:
            prefix = torch.as_tensor(rows[0]["input_ids"][:shared])
            segments.insert(0, (prefix, torch.full_like(prefix, IGNORE), torch.arange(shared)))
        ids, labels, positions = (torch.cat(parts) for parts in zip(*segments))
        bounds = torch.tensor([0, *torch.tensor([len(s[0]) for s in segments]).cumsum(0).tolist()])
        # A segment's first token has no prediction from inside its segment: never learn it from the one before.
        labels[bounds[:-1]] = IGNORE
        batch = {"input_ids": ids[None], "position_ids": positions[None], "labels": labels[None],
                 "row_bounds": bounds}
        if shared:
            batch["shared_prefix"] = torch.tensor(shared)
        return batch

    def _padded(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shared_prefix(rows: list[dict[str, Any]]) -> int:
    """How many leading tokens all rows share, stopping before any row's first target (so the token
    after the prefix, which follows another row in the pack, is never a target either)."""
    if len(rows) < 2:
        return 0
    limit = min(_first_target(r["labels"]) for r in rows) - 1
    first = rows[0]["input_ids"]
    n = 0
    while n < limit and all(r["input_ids"][n] == first[n] for r in rows[1:]):
        n += 1
    return n


def _first_target(labels: Any) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
