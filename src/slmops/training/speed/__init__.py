"""What makes adapter training fast on a CPU, each piece checked to leave the learning unchanged.

One module per job, and `speed_up` applying them to a model as `slmops finetune` does (the
benchmarks call it too, so they measure the product's own step):

- Packing (see `slmops.data.collate`) is used only after `packing.supports_packing` has seen, on this
  very model, that packed rows give the same logits as separate ones.
- `logits.causal_lm_loss` takes logits computed only where a label is supervised.
- `attention.use_segmented_attention`: PyTorch's CPU attention over a packed row computes every row against
  every other and masks the products away; a batch of 16 short rows then spends 16x the attention
  FLOPs (15% of a SmolLM2 step). Attention row by row costs what padding-free should.
- `logits.mlp_at_kept_positions`: the last layer's MLP only where a logit is read (the collator likewise
  leaves out each row's tokens after its last target).
- `memory.keep_freed_memory`: no page faults for activations freed and allocated again every step.
- `lengths.round_packed_lengths`: packed batches rounded up to a few lengths, so that oneDNN builds a CPU's
  bf16 matmul kernels once per length instead of every step.
- The adapter layers themselves are made cheaper in `fast_lora`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from slmops.data.collate import Collator
from slmops.data.pairs import PairCollator
from slmops.training.speed.attention import attends_row_by_row
from slmops.training.speed.lengths import round_packed_lengths
from slmops.training.speed.logits import mlp_at_kept_positions, takes_logits_to_keep
from slmops.training.speed.packing import drops_out, supports_packing

log = logging.getLogger(__name__)


@dataclass
class Batching:
    """How batches are made for this model, and what the manifest records of it."""
    collator: Any
    packing: bool  # rows end to end, no padding
    kept_logits: bool  # logits only where a label is supervised (and the last MLP only there)
    shared_prefix: bool  # the rows' common opening computed once per batch
    rounded_lengths: bool = False  # packed lengths rounded up to a few, for the CPU's bf16 matmul kernels


def speed_up(model: nn.Module, packing: bool, share_prefix: bool | None, reads_kept_logits: bool, pairs: bool,
             pad_token_id: int) -> Batching:
    """The batching this model supports, each fast path checked on it: packing where packed rows stay
    apart, kept logits where the loss reads only those, the shared prefix where it is exact (by default
    only when nothing drops out: a dropout mask drawn for the prefix would be shared by every row)."""
    if pairs:
        return Batching(PairCollator(pad_token_id, skip_logits=takes_logits_to_keep(model)), False, False, False)
    packed = packing and supports_packing(model)
    if packing and not packed:
        log.info("this model cannot keep packed rows apart; padding each batch instead")
    kept = packed and reads_kept_logits
    share = share_prefix if share_prefix is not None else not drops_out(model)
    shared = kept and share and attends_row_by_row(model)
    if kept:
        mlp_at_kept_positions(model)
    rounded = kept and round_packed_lengths(model, pad_token_id)
    return Batching(Collator(pad_token_id, pack=packed, keep_logits=kept, share_prefix=shared), packed, kept, shared,
                    rounded)
