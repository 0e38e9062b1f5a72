"""Fine-tuning methods by name, each a peft config (or none, for full fine-tuning).

Adding a method is one entry here: a function from the options and the target layers to
a peft config, plus its default learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from slmops.config import FinetuneConfig


@dataclass(frozen=True)
class Method:
    build: Callable[[FinetuneConfig, list[str], nn.Module], Any] | None  # -> peft config
    learning_rate: float
    quantized: bool = False


def _lora(cfg: FinetuneConfig, targets: list[str], model: nn.Module, **extra: Any) -> Any:
    from peft import LoraConfig
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, modules_to_save=cfg.modules_to_save, task_type="CAUSAL_LM",
                      **extra)


def _dora(cfg: FinetuneConfig, targets: list[str], model: nn.Module) -> Any:
    return _lora(cfg, targets, model, use_dora=True)


def _loha(cfg: FinetuneConfig, targets: list[str], model: nn.Module) -> Any:
    from peft import LoHaConfig
    return LoHaConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, module_dropout=cfg.lora_dropout,
                      target_modules=targets, modules_to_save=cfg.modules_to_save, task_type="CAUSAL_LM")


def _lokr(cfg: FinetuneConfig, targets: list[str], model: nn.Module) -> Any:
    from peft import LoKrConfig
    return LoKrConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, module_dropout=cfg.lora_dropout,
                      target_modules=targets, modules_to_save=cfg.modules_to_save, task_type="CAUSAL_LM")


def _ia3(cfg: FinetuneConfig, targets: list[str], model: nn.Module) -> Any:
    """IA3 scales activations; on feed-forward layers it scales their input, so name those."""
    from peft import IA3Config
    ffn = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()
                  if name.rsplit(".", 1)[-1] in targets and any(k in name for k in ("mlp", "feed_forward", "ffn"))})
    return IA3Config(target_modules=targets, feedforward_modules=ffn, modules_to_save=cfg.modules_to_save,
                     task_type="CAUSAL_LM")


METHODS: dict[str, Method] = {
    "lora": Method(_lora, 2e-4),
    "dora": Method(_dora, 2e-4),
    "qlora": Method(_lora, 2e-4, quantized=True),
    "loha": Method(_loha, 2e-4),
    "lokr": Method(_lokr, 2e-4),
    "ia3": Method(_ia3, 3e-3),
    "full": Method(None, 2e-5),
}


def quantization_config(compute_dtype: torch.dtype) -> Any:
    """4-bit NF4 with double quantisation: the QLoRA paper's recipe."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        from slmops.errors import UsageError
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
