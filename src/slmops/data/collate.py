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

    The examples, labels and the loss's normalisation (supervised tokens per batch) are the same
    either way: packing changes the speed, not what is learned.
    """

    def __init__(self, pad_token_id: int, pack: bool, keep_logits: bool = True):
        self.pad_token_id = pad_token_id
        self.pack = pack
        self.keep_logits = keep_logits

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._packed(rows) if self.pack else self._padded(rows)
        if self.keep_logits:
            keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
            keep[:, :-1] = batch["labels"][:, 1:] != IGNORE
            batch["logits_to_keep"] = keep
        return batch

    def _packed(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = torch.cat([torch.as_tensor(r["input_ids"]) for r in rows])
        labels = torch.cat([torch.as_tensor(r["labels"]) for r in rows])
        positions = torch.cat([torch.arange(len(r["input_ids"])) for r in rows])
        # A row's first token has no prediction from inside its row: never learn it from the row before.
        labels[positions == 0] = IGNORE
        bounds = torch.tensor([0, *torch.tensor([len(r["input_ids"]) for r in rows]).cumsum(0).tolist()])
        return {"input_ids": ids[None], "position_ids": positions[None], "labels": labels[None],
                "row_bounds": bounds}

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
