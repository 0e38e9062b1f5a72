"""What makes adapter training fast on a CPU, each piece checked to leave the learning unchanged.

- Packing (see `slmops.data.collate`) is used only after `supports_packing` has seen, on this very
  model, that packed rows give the same logits as separate ones.
- `causal_lm_loss` takes logits computed only where a label is supervised.
- `use_segmented_attention`: PyTorch's CPU attention over a packed row computes every row against
  every other and masks the products away; a batch of 16 short rows then spends 16x the attention
  FLOPs (15% of a SmolLM2 step). Attention row by row costs what padding-free should.
- `mlp_at_kept_positions`: the last layer's MLP only where a logit is read (the collator likewise
  leaves out each row's tokens after its last target).
- `keep_freed_memory`: no page faults for activations freed and allocated again every step.
- The adapter layers themselves are made cheaper in `slmops.training.fast_lora`.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import logging
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slmops.data.collate import Collator
from slmops.data.formatting import IGNORE
from slmops.training.fast_lora import FastDropout

log = logging.getLogger(__name__)


def supervised_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions whose next token is supervised, those tokens, and the mask of the
    positions (position t's target is labels[t + 1]). `logits` is either (positions kept, vocab) from
    `logits_to_keep`, or the full (batch, length, vocab) when the model cannot skip positions."""
    targets = labels[..., 1:]
    supervised = targets != IGNORE
    if logits.dim() == 3:
        logits = logits[:, :-1][supervised]
    return logits, targets[supervised], supervised


def causal_lm_loss(outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None):
    """Token cross-entropy on the supervised positions, normalised like transformers' own loss."""
    logits, targets, supervised = supervised_logits(outputs.logits, labels)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else supervised.sum().clamp(min=1))


SEGMENTED = "slmops_segmented_sdpa"


# arguments of transformers' SDPA wrapper that calling PyTorch's SDPA directly would not apply
_WRAPPER_ONLY = ("is_causal", "position_bias", "softcap")
# Rows up to this long attend in fp32 on a CPU: PyTorch's bf16 flash-attention backward is the slower
# one there for short rows (SST-2's 23-token rows: 8.0 ms a layer in bf16, 3.2 in fp32 with the casts;
# about even at 192-256 tokens; bf16 is faster from ~384 on: 2048-token rows 106 against 147 ms).
UPCAST_ROWS = 256


def segmented_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, row_bounds: torch.Tensor | None = None,
                   shared_prefix: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, run separately on each row of a packed batch (`row_bounds` from
    the collator: start offsets plus the total length); with `shared_prefix`, the first segment is
    the prefix the other rows continue from, and each row attends to it and then to itself. Anything
    else goes to transformers' SDPA unchanged.

    Rows call PyTorch's SDPA directly, as transformers' wrapper would (scale, dropout, grouped
    heads), and their outputs are joined before the one transpose back to (batch, length, heads,
    dim): the wrapper's per-call transposes and copies were a fifth of attention's time. Arguments
    only the wrapper applies (`_WRAPPER_ONLY`) send each row through the wrapper instead.

    Short rows in bf16 or fp16 on a CPU attend in fp32 (`UPCAST_ROWS`), packed or not: faster there,
    no less exact, and the same arithmetic for a row whether it comes packed or alone."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = row_bounds is not None and query.shape[0] == 1 and query.shape[2] == int(row_bounds[-1])
    prefix = int(shared_prefix) if packed and shared_prefix is not None else 0
    sizes = row_bounds.diff().tolist() if packed else []
    cpu = query.device.type == "cpu"
    # the dtype PyTorch's SDPA would compute and return in: autocast's, else the inputs'
    dtype = torch.get_autocast_dtype("cpu") if cpu and torch.is_autocast_enabled("cpu") else query.dtype
    longest = prefix + max(sizes) if packed else key.shape[2]
    upcast = cpu and dtype in (torch.bfloat16, torch.float16) and longest <= UPCAST_ROWS
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():  # autocast would cast back
        if not packed:
            out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0]
        else:
            out = torch.cat(_attend_rows(module, query, key, value, sizes, prefix, kwargs), dim=2).transpose(1, 2)
    return out.to(dtype).contiguous(), None


def _attend_rows(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 sizes: list[int], prefix: int, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """Each row's attention output, (1, heads, row length, dim); see `segmented_sdpa`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = kwargs.get("sliding_window")
    if any(kwargs.get(name) is not None for name in _WRAPPER_ONLY) or not getattr(module, "is_causal", True):
        def attend(q, k, v, mask):
            return sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0].transpose(1, 2)
    else:
        options = dict(dropout_p=kwargs.get("dropout", 0.0), scale=kwargs.get("scaling"),
                       enable_gqa=query.shape[1] != key.shape[1])

        def attend(q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, **options)
    # split, not slices: the backward of a split is one concatenation, that of each slice a zero-filled
    # tensor the size of the whole batch
    queries, keys, values = (t.split(sizes, dim=2) for t in (query, key, value))
    outputs = []
    for i, (q, k, v) in enumerate(zip(queries, keys, values)):
        offset = prefix if i > 0 else 0
        if offset:  # the prefix is the first segment
            k = torch.cat([keys[0], k], dim=2)
            v = torch.cat([values[0], v], dim=2)
        mask = None  # causal within the row
        if offset or (window and sizes[i] > window):
            positions = torch.arange(offset, offset + sizes[i], device=query.device)
            seen = torch.cat([torch.arange(offset, device=query.device), positions])
            mask = positions[:, None] >= seen[None]
            if window:
                mask &= positions[:, None] - seen[None] < window
            mask = mask[None, None]
        outputs.append(attend(q, k, v, mask))
    return outputs


def use_segmented_attention(model: nn.Module) -> bool:
    """Switch a model on SDPA to `segmented_sdpa` (same masks, same results); False if it is on another."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(SEGMENTED, segmented_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENTED, sdpa_mask)
    model.set_attn_implementation(SEGMENTED)
    return True


def drops_out(model: nn.Module) -> bool:
    """Whether training draws any dropout mask: a dropout layer, the adapters' included, or a dropout
    rate in the model's config (attention dropout is a kernel argument, not a layer)."""
    if any(isinstance(m, (nn.Dropout, FastDropout)) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    rates = config.to_dict().items() if config is not None else ()
    return any(("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0
               for key, value in rates)


def attends_row_by_row(model: nn.Module) -> bool:
    return getattr(model.config, "_attn_implementation", None) == SEGMENTED


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model can skip the vocabulary projection at positions nobody reads."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper takes **kwargs
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def supports_packing(model: nn.Module) -> bool:
    """Whether this model keeps packed rows apart and can compute logits at chosen positions.

    Tried, not assumed: two short random rows run separately and packed must give the same logits
    (a model whose attention ignores `position_ids` boundaries would mix the rows). transformers
    separates packed rows only without a KV cache, so training must run with `use_cache=False`.
    """
    if not takes_logits_to_keep(model):
        return False
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 5)]
    batch = Collator(0, pack=True, keep_logits=False)([{"input_ids": r, "labels": r} for r in rows])
    batch = {k: v.to(model.device) for k, v in batch.items() if k != "labels"}
    batch["logits_to_keep"] = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            separate = [model(input_ids=torch.tensor([r], device=model.device), use_cache=False).logits[0]
                        for r in rows]
            separate = torch.cat(separate).float()
            packed = model(**batch, use_cache=False).logits.float()
    except Exception as err:  # any failure means: do not pack this model
        log.debug("packing probe failed: %s", err)
        return False
    finally:
        model.train(training)
    if packed.shape != separate.shape:
        return False
    # Rounding moves logits by a tiny share of their spread; a row that sees the other moves by about all of it.
    tolerance = 1e-2 if next(model.parameters()).dtype == torch.float32 else 1e-1
    return (packed - separate).abs().max().item() <= tolerance * separate.std().item()


def last_mlp(model: nn.Module) -> nn.Module | None:
    """The dense MLP of the model's last decoder layer, or None (no such layer, or a mixture of experts)."""
    layers = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers and hasattr(module[-1], "mlp"):
            mlp = module[-1].mlp
            dense = not any(isinstance(m, nn.ModuleList) for m in mlp.modules())
            return mlp if isinstance(mlp, nn.Module) and dense else None
    return None


def mlp_at_kept_positions(model: nn.Module) -> bool:
    """Run the last layer's MLP only where logits are kept (a boolean `logits_to_keep`, as the collator
    passes): its output at any other position reaches no logit, so its gradient there is zero and the
    work was for nothing. With a one-word answer that is nearly all of the last layer's MLP.

    Only for losses that read the kept logits alone: the hidden state at other positions is left
    without the last MLP's contribution. Returns False when the model has no dense last MLP."""
    mlp = last_mlp(model)
    if mlp is None:
        return False
    kept: list[torch.Tensor | None] = [None]

    def remember(module, args, kwargs):
        keep = kwargs.get("logits_to_keep")
        ids = kwargs.get("input_ids")
        kept[0] = keep if (isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and ids is not None
                           and keep.shape == ids.shape and bool(keep.any())) else None

    def gather(module, args):
        keep = kept[0]
        if keep is None or args[0].shape[:2] != keep.shape:
            return None
        return (args[0][keep][None],)  # (1, kept, hidden): MLPs that expect (batch, length, hidden) still work

    def scatter(module, args, output):
        keep = kept[0]
        if keep is None or not isinstance(output, torch.Tensor) or output.shape[1] != int(keep.sum()):
            return None
        full = output.new_zeros(*keep.shape, output.shape[-1])
        full[keep] = output[0]
        return full

    model.register_forward_pre_hook(remember, with_kwargs=True)  # the outer model: peft calls .forward inside
    mlp.register_forward_pre_hook(gather)
    mlp.register_forward_hook(scatter)
    return True


def keep_freed_memory() -> bool:
    """Have glibc keep freed activations in the heap for the next step instead of handing each block
    over 128 KB back to the OS and faulting it in again (~10,000 page faults a step on SmolLM2; a step
    measured 2% faster without them). Blocks over 32 MB are still mapped and returned; the peak is
    unchanged, the heap just stops shrinking between steps. False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
