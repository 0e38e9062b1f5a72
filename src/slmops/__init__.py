"""slmops: fine-tune, evaluate, optimise and ship small language models.

The API is imported lazily so that `slmops --help` does not pay for torch and transformers.
"""

from typing import Any

from slmops.errors import UsageError

__all__ = ["UsageError", "finetune", "generate"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "finetune":
        from slmops.training.finetune import finetune
        return finetune
    if name == "generate":
        from slmops.generation import generate
        return generate
    raise AttributeError(f"module 'slmops' has no attribute {name!r}")
