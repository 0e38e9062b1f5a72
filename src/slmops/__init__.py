"""slmops: fine-tune, evaluate, optimise and ship small language models.

The API is imported lazily so that `slmops --help` does not pay for torch and transformers.
"""

from importlib import import_module
from typing import Any

from slmops.errors import UsageError

# name -> (module, attribute): the Python equivalent of each command
_API = {
    "finetune": ("slmops.training.finetune", "finetune"),
    "generate": ("slmops.generation", "generate"),
    "evaluate": ("slmops.evaluation.run", "evaluate"),
    "auto_opt": ("slmops.export.auto_opt", "auto_opt"),
    "generate_adapter": ("slmops.export.multi_adapter", "generate_adapter"),
    "run": ("slmops.workflow.engine", "run"),
}
__all__ = ["UsageError", *_API]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attribute = _API[name]
        return getattr(import_module(module), attribute)
    raise AttributeError(f"module 'slmops' has no attribute {name!r}")
