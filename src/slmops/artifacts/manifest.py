"""`manifest.json`: how an output folder was made, enough to reproduce it."""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from slmops.artifacts.folders import write_json
from slmops.artifacts.machine import cpu_features

PACKAGES = ("slmops", "torch", "transformers", "peft", "datasets", "accelerate", "safetensors", "bitsandbytes",
            "onnx", "onnxruntime", "onnxruntime-genai")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def peak_memory_mb() -> dict[str, float]:
    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "cpu": cpu_features()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_manifest(path: Path, command: str, options: dict, resolved: dict, data: dict, results: dict) -> None:
    manifest = {
        "command": command,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "options": options,
        "resolved": resolved,
        "data": data,
        "results": results,
        "seed": options.get("seed"),
        "versions": versions(),
        "hardware": hardware(),
    }
    write_json(path, manifest)
