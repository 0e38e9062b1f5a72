"""slmops: fine-tune, evaluate, optimise and ship small language models.

The API is imported lazily so that `slmops --help` does not pay for torch and transformers.
"""

from importlib import import_module
from typing import Any

from slmops.errors import UsageError

# the Python equivalent of each command, in slmops.api
_API = ("finetune", "generate", "evaluate", "benchmark", "review", "auto_opt", "quantize", "generate_adapter", "run")
__all__ = ["UsageError", *_API]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module("slmops.api"), name)
    raise AttributeError(f"module 'slmops' has no attribute {name!r}")
