"""The model a fine-tune trains: the base loaded for the method, then its adapter and the CPU fast paths.

The benchmarks build their model with these same functions, so they time the product's own step.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from slmops.errors import UsageError, first_line
from slmops.models.adapters import adapter_dir, attach_adapter
from slmops.models.loading import linear_module_names, load_model
from slmops.options.finetune_options import FinetuneOptions
from slmops.options.methods import METHODS
from slmops.training.speed.attention import use_segmented_attention
from slmops.training.speed.fast_lora import use_fast_lora
from slmops.training.speed.norms import use_fused_norms

log = logging.getLogger(__name__)


def load_base(opts: FinetuneOptions, model_path: str, amp: torch.dtype, checkpointing: bool, encoder: bool,
              gpu: bool) -> nn.Module:
    """The frozen base in the dtype the method wants: 4-bit for qlora, the autocast dtype under an adapter
    (a cast per step saved, and memory), fp32 master weights for full fine-tuning."""
    method = METHODS[opts.method]
    if method.quantized:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if gpu else "cpu"
        model = load_model(model_path, amp, opts.trust_remote_code, quantization_config(amp), {"": device}, encoder)
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(checkpointing))
        keep_4bit_trainable(model)
    else:
        base_dtype = amp if method.build is not None else torch.float32
        if opts.torch_dtype != "auto":
            base_dtype = getattr(torch, opts.torch_dtype)
        model = load_model(model_path, base_dtype, opts.trust_remote_code, encoder=encoder)
        if opts.quantization_aware:
            from slmops.models.fake_quant import fake_quantize
            log.info("quantization-aware: %d weight matrices rounded as the int4 export will hold them",
                     fake_quantize(model))
    model.config.use_cache = False
    return model


def attach_method(model: nn.Module, opts: FinetuneOptions, encoder: bool, gpu: bool) -> tuple[nn.Module, list[str]]:
    """The method's adapter on `model` (none for full fine-tuning), with row-by-row attention for packed
    CPU batches, the fused norms and LoRA layers; returns the model and the layers adapted."""
    # measured on CPU; GPUs run masked attention over a packed row well. Pairs are padded, never packed, and
    # so are a preference stage's batches (TRL's own collators), whose reference is a second adapter.
    own_batches = opts.stage == "sft"
    if opts.packing and not opts.text_pair_field and not gpu and own_batches:
        use_segmented_attention(model)
    if not gpu:
        use_fused_norms(model)
    method = METHODS[opts.method]
    targets = opts.target_modules or linear_module_names(model)
    if method.build is None:
        return model, []
    if opts.adapter_path:
        model = attach_adapter(model, adapter_dir(opts.adapter_path), opts.model_name_or_path, trainable=True)
        kept = model.peft_config["default"].target_modules
        targets = [kept] if isinstance(kept, str) else sorted(kept)
    else:
        from peft import get_peft_model
        peft_config = method.build(opts, targets, model)
        if encoder:
            peft_config.task_type = "FEATURE_EXTRACTION"  # peft's causal-LM wrapper needs generation methods
        try:
            model = get_peft_model(model, peft_config)
        except ValueError as err:
            raise UsageError(f"--method {opts.method} with --target_modules {','.join(targets)}: "
                             f"{first_line(err)}; layers with weights here: "
                             f"{', '.join(linear_module_names(model))}") from None
    if own_batches:
        use_fast_lora(model)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("%s on %s: %s trainable of %s parameters (%.2f%%)", opts.method, ",".join(targets),
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model, targets


def quantization_config(compute_dtype: torch.dtype) -> Any:
    """4-bit NF4 with double quantisation: the QLoRA paper's recipe."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError("--method qlora needs bitsandbytes: pip install 'slmops[qlora]'") from None
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def keep_4bit_trainable(model: nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On AVX-512-BF16 CPUs, the first eval-mode forward of a `Linear4bit` repacks its weight
    into a layout whose matmul has no backward, so training after any evaluation silently
    stops learning. Turning the fast path off keeps one layout for train and eval.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
