"""`--fsdp`: PyTorch FSDP2 through accelerate, the Hugging Face Trainer's own path, on CPU processes too.

On GPUs this is the Trainer unchanged (`fsdp=True` plus `fsdp_config`, launched with torchrun or
`accelerate launch`). accelerate turns FSDP on only for GPU-family process groups: CPU processes under
torchrun (gloo) silently get DDP, each holding the whole model. The sharding itself (torch's
`fully_shard` on gloo) works on CPU, so for a CPU run slmops marks accelerate's state as FSDP once the
Trainer has made it; wrapping, sharded checkpoints and resuming are then accelerate's and the
Trainer's code, as on a GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from slmops.errors import UsageError

# FSDP2; checkpoints as one shard per process (no gathering at each save), resumable on the same count
DEFAULTS = {"version": 2, "state_dict_type": "SHARDED_STATE_DICT"}


def wanted(value: Any) -> bool:
    """--fsdp given and not switched off (`--fsdp`, `--fsdp true`, `--fsdp "full_shard auto_wrap"`)."""
    return bool(value) and str(value).lower() not in ("false", "0", "no", "off")


def sharding_args(user: dict[str, Any], gpu: bool, method: str) -> dict[str, Any]:
    """The TrainingArguments for --fsdp / --deepspeed, checked before any model loads."""
    if user.get("deepspeed") and not gpu:
        raise UsageError("--deepspeed needs CUDA GPUs (DeepSpeed has no CPU training path in accelerate); on CPU "
                         "shard with --fsdp under torchrun")
    if not wanted(user.get("fsdp")):
        return {"fsdp": None} if "fsdp" in user else {}
    if user.get("deepspeed"):
        raise UsageError("--fsdp and --deepspeed both shard the model; choose one")
    if method == "qlora":  # 4-bit weights would need a float storage type to be split across processes
        raise UsageError("--fsdp does not shard --method qlora's 4-bit base yet; use --method lora with --fsdp "
                         "(the base is sharded instead of quantized), or qlora without --fsdp")
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UsageError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N "
                         "(N >= 2) -m slmops finetune ...; see docs/distributed.md")
    config = user.get("fsdp_config") or {}
    if isinstance(config, str):  # a JSON file, as transformers takes it
        path = Path(config).expanduser()
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UsageError(f"--fsdp_config {config}: not a readable JSON file ({err}); pass a JSON object or a "
                             f"path to one") from None
    config = {k.removeprefix("fsdp_"): v for k, v in config.items()}
    return {"fsdp": True, "fsdp_config": {**DEFAULTS, **config}}


def shard_on_cpu(trainer: Any) -> None:
    """Make accelerate treat this CPU process group as FSDP (see the module's docstring)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    for state in (PartialState(), trainer.accelerator.state):  # accelerate re-reads the first into the second
        state.distributed_type = DistributedType.FSDP
    trainer.accelerator.state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


def full_state_dict(model: Any) -> dict[str, Any]:
    """The whole model's weights gathered from every process's shard; every process must call it, and
    process 0 receives them (the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
