"""A command's workflow written as a file in Olive's shape (`--save_config_file`), which
`slmops run --config` loads back into the same validated options, so it runs (or reuses) the same pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from slmops.options.fields import fields_in
from slmops.options.finetune_options import DataOptions
from slmops.workflow.reading import LOADED
from slmops.workflow.passes import Workflow


def to_olive(wf: Workflow) -> dict[str, Any]:
    model = {"model_path": wf.model.path, "adapter_path": wf.model.adapter, "trust_remote_code": wf.trust_remote_code}
    out: dict[str, Any] = {"model": {"type": "HfModel", "config": _tidy(model)}, "passes": {}}
    for name, p in wf.passes.items():
        options = p.options
        given = options.model_dump(exclude_defaults=True, exclude=set(fields_in(type(options), "model")))
        given.pop("method", None)  # the pass type says it
        if isinstance(options, DataOptions):
            out["data_configs"] = _data_configs(given)
            if len(out["data_configs"]) > 1:
                given["eval_data_config"] = "eval_data"
        given.update(given.pop("training_args", {}))
        loss, loss_args = given.pop("loss", None), given.pop("loss_args", None)
        if loss or loss_args:
            given["loss"] = {"type": options.loss, "args": options.loss_args}
        out["passes"][name] = {"type": p.type, "config": given}
    return out


def _data_configs(given: dict[str, Any]) -> list[dict[str, Any]]:
    """The data options taken out of `given`: a training data config, and one for --eval_split."""
    data = {k: given.pop(k) for k in list(given) if k in fields_in(DataOptions, "data")}
    load = _tidy({"data_name": data.get("data_name"), "data_files": data.get("data_files"),
                  "split": data.get("train_split"), "subset": data.get("train_subset")})
    configs = [{"name": "train_data", "type": "HuggingfaceContainer", "load_dataset_config": load,
                "pre_process_data_config": {k: v for k, v in data.items() if k not in LOADED}}]
    if data.get("eval_split"):
        configs.append({**configs[0], "name": "eval_data", "load_dataset_config": _tidy(
            {**load, "split": data["eval_split"], "subset": data.get("eval_subset") or load.get("subset")})})
    return configs


def save_config(wf: Workflow, path: str) -> Path:
    """Write the workflow file (JSON for .json, else YAML) that `slmops run --config` runs as is."""
    from slmops.artifacts.folders import write_text

    content = to_olive(wf)
    out = Path(path).expanduser()
    return write_text(out, json.dumps(content, indent=2) + "\n" if out.suffix == ".json"
                      else yaml.safe_dump(content, sort_keys=False, allow_unicode=True))


def _tidy(section: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if v is not None}
