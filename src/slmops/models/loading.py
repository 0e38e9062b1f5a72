"""Resolve a model name to local weights and load the model the same way everywhere."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from slmops.errors import UsageError
from slmops.models.tokenizers import cannot_load

log = logging.getLogger(__name__)


def is_encoder(path: str, trust_remote_code: bool = False) -> bool:
    """A BERT-like encoder (all-MiniLM, RoBERTa, ...): it trains on sentence pairs and loads without a
    language-model head. AutoModelForCausalLM would bolt a random head onto it instead."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise cannot_load(path, err) from None
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return (config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_decoder
            and not config.is_encoder_decoder and not causal & set(config.architectures or ()))


def load_model(path: str, dtype: torch.dtype, trust_remote_code: bool = False,
               quantization_config: Any = None, device_map: Any = None, encoder: bool = False) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    try:
        return (AutoModel if encoder else AutoModelForCausalLM).from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code,
            quantization_config=quantization_config, device_map=device_map)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise UsageError(f"{path} needs custom code from its repository; pass --trust_remote_code "
                             f"if you trust it") from None
        raise cannot_load(path, err) from None


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer except the LM head: our default LoRA targets."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
             if isinstance(mod, (nn.Linear, Conv1D)) and mod is not head}
    names.discard("lm_head")
    return sorted(names)
