"""slmops: fine-tune, evaluate, optimise and ship small language models.

The API is imported lazily so that `slmops --help` does not pay for torch and transformers.
"""

import logging
from importlib import import_module
from typing import Any

from slmops.errors import UsageError

# the Python equivalent of each command, in slmops.api
_API = ("finetune", "generate", "evaluate", "benchmark", "review", "auto_opt", "quantize", "generate_adapter", "run")
__all__ = ["UsageError", *_API]
__version__ = "0.1.0"

# peft imports bitsandbytes where it is installed (the qlora extra), whose CPU build looks for a 4-bit kernel on
# the Hub through `kernels` and warns at import, on every command and API call: only QLoRA could use that
# kernel, and nothing is there to act on. Muted here, before anything imports peft, for every entry point.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("kernels").setLevel(logging.ERROR)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module("slmops.api"), name)
    raise AttributeError(f"module 'slmops' has no attribute {name!r}")
