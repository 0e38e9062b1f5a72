"""Run a workflow's passes in order, skipping those already done with the same inputs.

A pass is done when its folder holds `pass.json` with the pass's key: a hash of the pass type and
settings, the input model's content (for an earlier pass's output, that pass's key), the data's
content and the slmops version. Two different models therefore never share a result (Olive
issue #1936), a changed pass re-runs with everything after it, and a pass interrupted halfway has
no `pass.json` in its published folder, so it is never taken as done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from slmops.errors import UsageError
from slmops.models.catalog import cache_root
from slmops.outputs import write_json
from slmops.workflow.config import finetune_options
from slmops.workflow.schema import FINETUNE_TYPES, FinetunePass, Workflow
from slmops.workflow.passes import PASSES, ModelRef, Step, read_json

log = logging.getLogger(__name__)

PASS_FILE = "pass.json"
NOT_KEYED = {"output_path", "overwrite", "resume_from_checkpoint", "parity_prompts", "logging_dir"}


def run(config: str | os.PathLike | dict[str, Any], search_only: bool = False) -> ModelRef:
    """`slmops run --config`: a workflow file (or the same as a dict) run to its final model."""
    from slmops.workflow.config import load_workflow, validate

    return run_workflow(validate(config) if isinstance(config, dict) else load_workflow(str(config)), search_only)


def plan(wf: Workflow) -> list[dict[str, Any]]:
    """Each pass with its folder, key and whether it would run; no model is loaded."""
    model_key = input_key(wf)
    steps, earlier_runs = [], False
    for name, settings in wf.passes.items():
        kind = wf.spec.passes[name].type
        key = _digest({"type": kind, "settings": _keyed(wf, name, settings), "input": model_key,
                       "data": _data_keys(wf, name, settings), "version": _version()})
        out = pass_folder(wf, name)
        record = read_json(out / PASS_FILE) or {}
        forced = bool(getattr(settings, "overwrite", False))  # --overwrite asks for a fresh run
        done = record.get("key") == key and "output_model" in record and not forced and not earlier_runs
        earlier_runs = earlier_runs or not done  # a pass that runs again is followed by its consumers
        steps.append({"name": name, "type": kind, "folder": str(out), "key": key, "done": done,
                      "owned": getattr(settings, "output_path", None) is None})  # ours, not the user's
        model_key = key
    return steps


def run_workflow(wf: Workflow, search_only: bool = False) -> ModelRef:
    """Run the passes not yet done; returns the final model. With a search_strategy, the first
    fine-tuning pass is a hyperparameter search (slmops.workflow.search); `search_only` stops after it
    (what `slmops search` runs, so that several workers can share one study)."""
    started = time.perf_counter()
    model = _input_model(wf)
    record = []
    searched = searched_pass(wf) if wf.spec.search_strategy is not None else None
    for entry in plan(wf):
        name, out, owned = entry["name"], Path(entry["folder"]), entry["owned"]
        step = Step(name, entry["type"], wf.passes[name], wf, model, out, owned, entry["key"])
        if entry["done"]:
            model = ModelRef(**read_json(out / PASS_FILE)["output_model"])
            log.info("pass %s (%s): unchanged since its last run; reusing %s", name, entry["type"], out)
            record.append({**entry, "ran": False})
            if search_only and name == searched:
                break
            continue
        log.info("pass %s (%s): running on %s -> %s", name, entry["type"], model.describe(), out)
        took = time.perf_counter()
        if owned and name != searched and _main_process():  # a search keeps its study in its folder
            _start_partial(out, entry["key"])
        if name == searched:
            from slmops.workflow.search import search
            model = search(step)
        else:
            model = PASSES[entry["type"]](step)
        if _main_process():
            write_json(out / PASS_FILE, {**entry, "output_model": asdict(model),
                                         "seconds": round(time.perf_counter() - took, 2)})
        record.append({**entry, "ran": True, "seconds": round(time.perf_counter() - took, 2)})
        if search_only and name == searched:
            break
    if _main_process() and any(e["owned"] for e in record):
        write_json(wf.output_dir / "workflow.json", {
            "config": wf.source, "passes": record, "output_model": asdict(model),
            "wall_time_s": round(time.perf_counter() - started, 2)})
    log.info("workflow done in %.1f s: %s", time.perf_counter() - started, model.describe())
    return model


def _main_process() -> bool:
    """Under torchrun every rank runs the workflow; only rank 0 writes the records."""
    return int(os.environ.get("RANK", "0")) == 0


def _start_partial(out: Path, key: str) -> None:
    """Keep an interrupted attempt of this same pass (a fine-tune resumes from its checkpoint);
    drop one left by different settings."""
    partial = out.with_name(out.name + ".partial")
    if (read_json(partial / PASS_FILE) or {}).get("key") != key:
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    write_json(partial / PASS_FILE, {"key": key, "status": "running"})


def _input_model(wf: Workflow) -> ModelRef:
    cfg = wf.spec.model.config
    if wf.spec.model.type == "OnnxModel":
        return ModelRef(cfg.model_path, onnx=True)
    return ModelRef(cfg.model_path, cfg.adapter_path)


def _keyed(wf: Workflow, name: str, settings: Any) -> dict[str, Any]:
    """The settings that change a pass's result (a fine-tune's: everything finetune is given)."""
    if isinstance(settings, FinetunePass):
        options = finetune_options(wf.spec, name, settings, "-")
        options.pop("model_name_or_path")
        loss = options.get("loss") or ""
        loss_file = Path(loss.rsplit(":", 1)[0]).expanduser() if ":" in loss else None
        if loss_file is not None and loss_file.is_file():  # a user's loss: its code is part of the recipe
            options["loss_file"] = file_digest(loss_file)  # (a missing file is finetune's to report)
        if wf.spec.search_strategy is not None and name == searched_pass(wf):
            options["search"] = wf.spec.model_dump(mode="json", include={"search_strategy", "search_space"})
        return {k: v for k, v in options.items() if k not in NOT_KEYED}
    return settings.model_dump(mode="json", exclude=NOT_KEYED)


def pass_folder(wf: Workflow, name: str) -> Path:
    """A pass's folder: its `output_path`, else OUTPUT_DIR/NAME (the searched pass's holds its study)."""
    explicit = getattr(wf.passes[name], "output_path", None)
    return Path(explicit).expanduser() if explicit else wf.output_dir / name


def searched_pass(wf: Workflow) -> str | None:
    return next((n for n, p in wf.spec.passes.items() if p.type in FINETUNE_TYPES), None)


def _data_keys(wf: Workflow, name: str, settings: Any) -> list[str]:
    if not (isinstance(settings, FinetunePass) or wf.spec.passes[name].type == "Evaluate"):
        return []  # only fine-tuning and Evaluate read data
    used = [getattr(settings, k, None) for k in ("train_data_config", "eval_data_config", "data_config")]
    used = [u for u in used if u] or [wf.spec.data_configs[0].name]
    keys = []
    for d in wf.spec.data_configs:
        if d.name in used:
            load = d.load_dataset_config
            files = [load.data_files] if isinstance(load.data_files, str) else (load.data_files or [])
            local = [Path(f).expanduser() for f in [load.data_name or "", *files] if f and Path(f).expanduser().exists()]
            keys.append(_digest({"spec": d.model_dump(mode="json"), "files": [file_digest(p) for p in local]}))
    return keys


def input_key(wf: Workflow) -> str:
    """The content of the workflow's input model (and adapter): files hashed, hub ids by name."""
    from slmops.models.loading import resolve

    cfg = wf.spec.model.config
    parts = []
    for given in (cfg.model_path, cfg.adapter_path):
        if given is None:
            continue
        path = Path(given).expanduser()
        if not path.exists() and wf.spec.model.type != "OnnxModel":
            try:
                path = Path(resolve(given))  # a catalogue alias: its local copy
            except UsageError:
                pass
        parts.append(file_digest(path) if path.exists() else f"name:{given}")
    return _digest(parts)


def file_digest(path: Path) -> str:
    """sha256 over a file, or a folder's files (names and bytes). Remembered per (path, size, mtime)
    in ~/.cache/slmops/digests.json, so an unchanged multi-GB model is read once."""
    if not path.exists():
        raise UsageError(f"not found: {path}; check the path in the workflow")
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    memo_file = cache_root() / "digests.json"
    memo = read_json(memo_file) or {}
    total, changed = hashlib.sha256(), False
    for f in files:
        st = f.stat()
        ident = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if ident not in memo:
            h = hashlib.sha256()
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
            memo[ident], changed = h.hexdigest(), True
        total.update(f"{f.relative_to(path) if f != path else f.name}:{memo[ident]}\n".encode())
    if changed:
        try:
            write_json(memo_file, memo)
        except OSError:
            pass  # a read-only home only costs re-hashing next time
    return total.hexdigest()


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _version() -> str:
    from slmops import __version__
    return __version__
