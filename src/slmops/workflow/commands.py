"""The workflow each command stands for: `finetune`, `auto-opt` and `generate-adapter` build one of
these and hand it to the engine, so a command and `run --config` share one execution path, and
`--save_config_file` writes exactly what the command runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from slmops.workflow.schema import FINETUNE_TYPES

log = logging.getLogger(__name__)

PASS_TYPE = {method: kind for kind, method in FINETUNE_TYPES.items()}
PRE_PROCESS = ("text_template", "text_field", "use_chat_template", "max_seq_len", "max_samples", "train_on_prompt",
               "add_eos", "eval_fraction", "max_eval_samples")


def finetune_workflow(options: dict[str, Any]) -> dict[str, Any]:
    """`slmops finetune` options (FinetuneConfig's) as a one-pass workflow in Olive's shape."""
    o = {k: v for k, v in options.items() if v is not None}
    load = {"data_name": o.pop("data_name", None), "data_files": o.pop("data_files", None),
            "split": o.pop("train_split", "train"), "subset": o.pop("train_subset", None)}
    data = [{"name": "train_data", "type": "HuggingfaceContainer", "load_dataset_config": _tidy(load),
             "pre_process_data_config": {k: o.pop(k) for k in PRE_PROCESS if k in o}}]
    settings: dict[str, Any] = {}
    eval_split, eval_subset = o.pop("eval_split", None), o.pop("eval_subset", None)
    if eval_split:
        data.append({**data[0], "name": "eval_data", "load_dataset_config": _tidy(
            {**load, "split": eval_split, "subset": eval_subset or load["subset"]})})
        settings["eval_data_config"] = "eval_data"
    loss, loss_args = o.pop("loss", "cross_entropy"), o.pop("loss_args", {})
    if loss != "cross_entropy" or loss_args:
        settings["loss"] = {"type": loss, "args": loss_args}
    model = {"type": "HfModel", "config": {"model_path": o.pop("model_name_or_path"),
                                           "trust_remote_code": o.pop("trust_remote_code", False)}}
    kind = PASS_TYPE[o.pop("method", "lora")]
    settings.update(o)
    return {"model": model, "data_configs": data, "passes": {"finetune": {"type": kind, "config": settings}}}


def export_workflow(model_name_or_path: str, adapter_path: str | None, pass_type: str,
                    settings: dict[str, Any], trust_remote_code: bool = False) -> dict[str, Any]:
    """`auto-opt` (pass ModelBuilder) and `generate-adapter` (ExtractAdapters) as one-pass workflows."""
    model = {"model_path": model_name_or_path, "adapter_path": adapter_path, "trust_remote_code": trust_remote_code}
    return {"model": {"type": "HfModel", "config": _tidy(model)},
            "passes": {"export": {"type": pass_type, "config": _tidy(settings)}}}


def run_command(workflow: dict[str, Any], save_config_file: str | None = None) -> Any:
    """What each command does after parsing its flags: optionally save the workflow, then run it."""
    from slmops.workflow.config import validate
    from slmops.workflow.engine import run_workflow

    if save_config_file:
        log.info("wrote %s (run it with: slmops run --config %s)", save_config(workflow, save_config_file),
                 save_config_file)
    return run_workflow(validate(workflow))


def save_config(workflow: dict[str, Any], path: str) -> Path:
    """Write a workflow file (JSON for .json, else YAML) that `slmops run --config` runs as is."""
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    text = (json.dumps(workflow, indent=2) + "\n" if out.suffix == ".json"
            else yaml.safe_dump(workflow, sort_keys=False, allow_unicode=True))
    out.write_text(text, encoding="utf-8")
    return out


def _tidy(section: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if v is not None}
