"""Fine-tuning methods by name, peft's way: each is registered once with what it builds.

A method is its name (`--method`), its pass type in a workflow file (Olive's `LoRA`, `QLoRA`, ...),
its default learning rate, and a function from the options, the target layers and the model to a
peft config (None for full fine-tuning). Adding a method is one `register` call: the CLI's choices,
the workflow pass types, the docs and the trainer all read this registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

Builder = Callable[[Any, list[str], Any], Any]  # (finetune options, target layer names, model) -> peft config


@dataclass(frozen=True)
class Method:
    name: str
    pass_type: str
    learning_rate: float
    build: Builder | None  # None: every weight trains (no adapter)
    quantized: bool = False  # the frozen base is loaded in 4 bits (bitsandbytes)


METHODS: dict[str, Method] = {}


def register(name: str, pass_type: str, learning_rate: float, build: Builder | None, quantized: bool = False) -> None:
    METHODS[name] = Method(name, pass_type, learning_rate, build, quantized)


def _lora(opts: Any, targets: list[str], model: Any, **extra: Any) -> Any:
    from peft import LoraConfig
    return LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                      target_modules=targets, modules_to_save=opts.modules_to_save, task_type="CAUSAL_LM", **extra)


def _dora(opts: Any, targets: list[str], model: Any) -> Any:
    return _lora(opts, targets, model, use_dora=True)


def _loha(opts: Any, targets: list[str], model: Any) -> Any:
    from peft import LoHaConfig
    return LoHaConfig(r=opts.lora_r, alpha=opts.lora_alpha, module_dropout=opts.lora_dropout,
                      target_modules=targets, modules_to_save=opts.modules_to_save, task_type="CAUSAL_LM")


def _lokr(opts: Any, targets: list[str], model: Any) -> Any:
    from peft import LoKrConfig
    return LoKrConfig(r=opts.lora_r, alpha=opts.lora_alpha, module_dropout=opts.lora_dropout,
                      target_modules=targets, modules_to_save=opts.modules_to_save, task_type="CAUSAL_LM")


def _ia3(opts: Any, targets: list[str], model: Any) -> Any:
    """IA3 scales activations; on feed-forward layers it scales their input, so name those."""
    from peft import IA3Config
    ffn = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()
                  if name.rsplit(".", 1)[-1] in targets and any(k in name for k in ("mlp", "feed_forward", "ffn"))})
    return IA3Config(target_modules=targets, feedforward_modules=ffn, modules_to_save=opts.modules_to_save,
                     task_type="CAUSAL_LM")


register("lora", "LoRA", 2e-4, _lora)
register("qlora", "QLoRA", 2e-4, _lora, quantized=True)
register("dora", "DoRA", 2e-4, _dora)
register("loha", "LoHa", 2e-4, _loha)
register("lokr", "LoKr", 2e-4, _lokr)
register("ia3", "IA3", 3e-3, _ia3)
register("full", "FullFineTune", 2e-5, None)
