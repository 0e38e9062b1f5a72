"""Run a workflow's passes in order, skipping those already done with the same inputs.

Every entry point comes here: `slmops run --config`, the `finetune`, `auto-opt` and
`generate-adapter` commands, and their Python functions. A pass is done when its folder holds
`pass.json` with the pass's key: a hash of the pass type and its validated options, the input
model's content (for an earlier pass's output, that pass's key), the content of the local data
files it reads and the slmops version. Two different models therefore never share a result (Olive
issue #1936), a changed pass re-runs with everything after it, and a pass interrupted halfway has no
`pass.json` in its published folder, so it is never taken as done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from slmops.artifacts.folders import file_digest, partial_dir, read_json, write_json
from slmops.errors import UsageError
from slmops.workflow.passes import ModelRef, PassPlan, Step, Workflow, pass_types

log = logging.getLogger(__name__)

PASS_FILE = "pass.json"
NOT_KEYED = {"output_path", "overwrite", "resume_from_checkpoint", "parity_prompts", "logging_dir",
             "model_name_or_path", "base_model_path", "adapter_path"}  # the input model is keyed by content
NOT_SEARCH_KEYED = {"storage", "heartbeat_interval", "grace_period"}  # where and how the study is kept


def plan(wf: Workflow) -> list[dict[str, Any]]:
    """Each pass with its folder, key and whether it would run; no model is loaded."""
    model_key = input_key(wf)
    steps, earlier_runs = [], False
    for name, p in wf.passes.items():
        key = _digest({"type": p.type, "settings": _keyed(wf, name, p), "input": model_key,
                       "data": _data_digests(p.options), "version": _version()})
        record = read_json(p.folder / PASS_FILE) or {}
        forced = bool(getattr(p.options, "overwrite", False))  # --overwrite asks for a fresh run
        done = record.get("key") == key and "output_model" in record and not forced and not earlier_runs
        earlier_runs = earlier_runs or not done  # a pass that runs again is followed by its consumers
        steps.append({"name": name, "type": p.type, "folder": str(p.folder), "key": key, "done": done,
                      "owned": p.owned})
        model_key = key
    return steps


def run_workflow(wf: Workflow, search_only: bool = False) -> ModelRef:
    """Run the passes not yet done; returns the final model. With a search_strategy, the first
    fine-tuning pass is a hyperparameter search (slmops.workflow.search); `search_only` stops after it
    (what `slmops search` runs, so that several workers can share one study)."""
    started = time.perf_counter()
    model = wf.model
    record = []
    searched = wf.searched_pass()
    steps = plan(wf)
    check_inputs(wf, steps)
    for entry in steps:
        name, out, owned = entry["name"], Path(entry["folder"]), entry["owned"]
        p = wf.passes[name]
        step = Step(name, entry["type"], p.options, model, out, owned, entry["key"], p.callbacks)
        if entry["done"]:
            model = ModelRef(**read_json(out / PASS_FILE)["output_model"])
            log.info("pass %s (%s): unchanged since its last run; reusing %s", name, entry["type"], out)
            record.append({**entry, "ran": False})
        else:
            log.info("pass %s (%s): running on %s -> %s", name, entry["type"], model.describe(), out)
            took = time.perf_counter()
            if owned and name != searched and _main_process():  # a search keeps its study in its folder
                _start_partial(out, entry["key"])
            if name == searched:
                from slmops.workflow.search import search
                model = search(step, wf)
            else:
                model = pass_types()[entry["type"]].run(step)
            seconds = round(time.perf_counter() - took, 2)
            if _main_process():
                write_json(out / PASS_FILE, {**entry, "output_model": vars(model), "seconds": seconds})
            record.append({**entry, "ran": True, "seconds": seconds})
        if search_only and name == searched:
            break
    if _main_process() and any(e["owned"] for e in record):
        write_json(wf.output_dir / "workflow.json", {
            "config": wf.source, "passes": record, "output_model": vars(model),
            "wall_time_s": round(time.perf_counter() - started, 2)})
    log.info("workflow done in %.1f s: %s", time.perf_counter() - started, model.describe())
    return model


def check_inputs(wf: Workflow, steps: list[dict[str, Any]]) -> None:
    """Refuse a wrong model or data path before any pass runs: a pass imports its trainer or exporter
    (~5 s) before it reads its inputs, and a later pass's typo would otherwise surface only after the
    earlier passes' work."""
    from slmops.data.sources import local_files
    from slmops.models.catalog import resolve

    pending = [s for s in steps if not s["done"]]
    if pending and pending[0] is steps[0] and not Path(wf.model.path).expanduser().exists():
        resolve(wf.model.path)  # a missing path is refused (an existing folder is the pass's to read: it may
        # be a finetune output folder, an ONNX export), an alias fetched, a hub id left to the pass
    for entry in pending:
        options = wf.passes[entry["name"]].options
        if getattr(options, "data_name", None) or getattr(options, "data_files", None):
            local_files(options.data_name, options.data_files)


def _main_process() -> bool:
    """Under torchrun every rank runs the workflow; only rank 0 writes the records."""
    return int(os.environ.get("RANK", "0")) == 0


def _start_partial(out: Path, key: str) -> None:
    """Keep an interrupted attempt of this same pass (a fine-tune resumes from its checkpoint);
    drop one left by different settings."""
    partial = partial_dir(out)
    if (read_json(partial / PASS_FILE) or {}).get("key") != key:
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    write_json(partial / PASS_FILE, {"key": key, "status": "running"})


def _keyed(wf: Workflow, name: str, p: PassPlan) -> dict[str, Any]:
    """The options that change a pass's result; a user's loss file by its content."""
    options = p.options.model_dump(mode="json", exclude=NOT_KEYED)
    loss = options.get("loss") or ""
    loss_file = Path(loss.rsplit(":", 1)[0]).expanduser() if ":" in loss else None
    if loss_file is not None and loss_file.is_file():  # a user's loss: its code is part of the recipe
        options["loss_file"] = file_digest(loss_file)  # (a missing file is finetune's to report)
    if name == wf.searched_pass():
        options["search"] = {"search_strategy": wf.search.model_dump(mode="json", exclude=NOT_SEARCH_KEYED),
                             "search_space": {k: v.model_dump(mode="json") for k, v in wf.space.items()}}
    return options


def _data_digests(options: Any) -> list[str]:
    """The content of the local data files a pass reads (a hub dataset is keyed by its name)."""
    named = [getattr(options, "data_name", None), *(getattr(options, "data_files", None) or [])]
    local = [Path(f).expanduser() for f in named if f and Path(f).expanduser().exists()]
    return [file_digest(p) for p in local]


def input_key(wf: Workflow) -> str:
    """The content of the workflow's input model (and adapter): files hashed, hub ids by name."""
    from slmops.models.catalog import resolve

    parts = []
    for given in (wf.model.path, wf.model.adapter):
        if given is None:
            continue
        path = Path(given).expanduser()
        if not path.exists() and not wf.model.onnx:
            try:
                path = Path(resolve(given))  # a catalogue alias: its local copy
            except UsageError:
                pass
        parts.append(file_digest(path) if path.exists() else f"name:{given}")
    return _digest(parts)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _version() -> str:
    from slmops import __version__
    return __version__
