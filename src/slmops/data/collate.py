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

    With `keep_logits` (a loss that reads only the supervised positions' logits), a packed row also
    goes in only up to the token before its last target: what follows (an answer's closing token)
    reaches no logit. `labels` then hold each input position's target one place on, one longer than
    `input_ids`.

    The examples, targets and the loss's normalisation (supervised tokens per batch) are the same
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
            keep = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
            targets = batch["labels"][:, 1:]
            keep[:, :targets.shape[1]] = targets != IGNORE
            batch["logits_to_keep"] = keep
        return batch

    def _packed(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        shared = shared_prefix(rows) if self.share_prefix else 0
        segments = [(r["input_ids"], r["labels"], shared) for r in rows]
        if shared:
            segments.insert(0, (rows[0]["input_ids"][:shared], [IGNORE] * shared, 0))
        if self.keep_logits:
            return self._packed_targets(segments, shared)
        ids, labels, positions = (torch.cat(parts) for parts in zip(*[
            (torch.as_tensor(tokens[start:]), torch.as_tensor(targets[start:]), torch.arange(start, len(tokens)))
            for tokens, targets, start in segments]))
        bounds = _bounds(len(tokens) - start for tokens, _, start in segments)
        # A segment's first token has no prediction from inside its segment: never learn it from the one before.
        labels[bounds[:-1]] = IGNORE
        return self._finish(ids, positions, labels, bounds, shared)

    def _packed_targets(self, segments: list[tuple[Any, Any, int]], shared: int) -> dict[str, torch.Tensor]:
        """Packing for a loss that reads only the kept logits: each row goes in up to the token before
        its last target (what follows reaches no logit: the closing token of an answer, say), and
        `labels` holds each input position's own target one place on, one longer than `input_ids`
        (position t's target is labels[t + 1], as a causal loss reads them)."""
        ids, targets, positions = [], [], []
        for tokens, labels, start in segments:
            end = _last_target(labels) or len(tokens)
            ids.append(torch.as_tensor(tokens[start:end]))
            targets.append(torch.as_tensor([*labels, IGNORE][start + 1:end + 1]))  # the last token predicts nothing
            positions.append(torch.arange(start, end))
        bounds = _bounds(len(i) for i in ids)
        labels = torch.cat([torch.tensor([IGNORE]), *targets])
        return self._finish(torch.cat(ids), torch.cat(positions), labels, bounds, shared)

    @staticmethod
    def _finish(ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor, bounds: torch.Tensor,
                shared: int) -> dict[str, torch.Tensor]:
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


def _bounds(lengths) -> torch.Tensor:
    """Start offsets of the segments laid end to end, plus the total length."""
    return torch.tensor([0, *torch.tensor(list(lengths)).cumsum(0).tolist()])


def _last_target(labels: Any) -> int:
    """The index of the last supervised token (0 when there is none)."""
    return next((i for i in range(len(labels) - 1, -1, -1) if labels[i] != IGNORE), 0)


def _first_target(labels: Any) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
