"""`slmops generate-adapter`: one ONNX base whose LoRA weights are graph inputs, one file per adapter.

How the graph learns which input is which adapter tensor: the builder is given a rank-1 "union"
adapter covering every adapted layer, whose weights are codes (A of layer k is all k+1; B's row j
is (k+1)*CODE_STRIDE + j). Reading the codes back from the built graph maps each ONNX weight,
including any the builder split (packed q/k/v), to an adapter tensor and rows, for any
architecture the builder knows, without relying on its naming. Those weights then become inputs
whose defaults have rank 0, so the model runs as the plain base when no adapter is active.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmops.artifacts.folders import folder_mb, work_dir
from slmops.artifacts.manifest import write_manifest
from slmops.errors import UsageError
from slmops.export import parity
from slmops.export.auto_opt import check_target, publish_checked
from slmops.export.builder import build, lora_kept_float, lora_weights, read_graph
from slmops.export.source import quantization_aware, run_manifest
from slmops.models.adapters import adapter_dir, attach_adapter, check_layers
from slmops.models.catalog import resolve
from slmops.models.genai import ADAPTER_SUFFIX, GenaiModel
from slmops.models.loading import load_model
from slmops.models.tokenizers import load_tokenizer
from slmops.options.export_options import ExtractAdaptersOptions

log = logging.getLogger(__name__)

CODE_STRIDE = 1 << 15  # larger than any adapted layer's output size we accept
RANK = "lora_r"


@dataclass
class Adapter:
    name: str
    folder: Path
    manifest: dict | None
    tensors: dict[str, dict[str, np.ndarray]]  # module path -> {"A": [r, in], "B": [out, r] * scaling}


def read_adapter(path: str, name: str | None) -> Adapter:
    """A LoRA adapter's tensors by module, scaling folded into B (as the builder does)."""
    from safetensors.numpy import load_file

    folder = adapter_dir(path)
    config = json.loads((folder / "adapter_config.json").read_text())
    manifest = run_manifest(folder.parent)
    name = name or (manifest or {}).get("options", {}).get("task_name") or (
        folder.parent.name if folder.name == "adapter" else folder.name)
    problem = _unsupported(config)
    if problem:
        raise UsageError(f"adapter {path}: {problem}; generate-adapter switches plain LoRA adapters only")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise UsageError(f"adapter {path}: no adapter_model.safetensors in {folder}; pass the folder "
                         f"`slmops finetune` wrote")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
    tensors: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(str(weights)).items():
        module, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        side = part.split(".")[0]
        if side in ("A", "B"):
            tensors.setdefault(module, {})[side] = value.astype(np.float32) * (scaling if side == "B" else 1.0)
    return Adapter(name, folder, manifest, tensors)


def _unsupported(config: dict) -> str | None:
    if config.get("peft_type") != "LORA":
        return f"it is a {config.get('peft_type')} adapter"
    if config.get("use_dora"):
        return "it is a DoRA adapter (its magnitude vector cannot be a LoRA input)"
    if config.get("modules_to_save"):
        return f"it trains whole layers too (modules_to_save: {config['modules_to_save']})"
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        return "it uses per-layer ranks or alphas (rank_pattern/alpha_pattern)"
    if config.get("fan_in_fan_out"):
        return "it uses fan_in_fan_out (Conv1D layers)"
    return None


def _coded_adapter(base_path: str, modules: list[str], folder: Path, trust_remote_code: bool) -> None:
    from peft import LoraConfig, get_peft_model

    model = load_model(base_path, torch.float32, trust_remote_code)
    model = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=modules))
    found = {name.removeprefix("base_model.model."): mod for name, mod in model.named_modules()
             if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})}
    with torch.no_grad():
        for k, module in enumerate(modules):
            layer = found[module]
            layer.lora_A["default"].weight.fill_(k + 1)
            out = layer.lora_B["default"].weight.shape[0]
            layer.lora_B["default"].weight[:, 0] = (k + 1) * CODE_STRIDE + torch.arange(out, dtype=torch.float32)
    model.save_pretrained(folder)


def _decode(graph_dir: Path, modules: list[str]) -> dict[str, tuple[str, str, np.ndarray | None]]:
    """ONNX weight name -> (module, "A" or "B", rows of B it holds) from the coded weights."""
    from onnx import numpy_helper

    proto = read_graph(graph_dir)
    weights = lora_weights(proto)
    mapping = {}
    for init in proto.graph.initializer:
        if init.name not in weights:
            continue
        value = numpy_helper.to_array(init, base_dir=str(graph_dir)).astype(np.float64)
        if "/lora_A/" in weights[init.name]:
            mapping[init.name] = (modules[int(round(value.flat[0])) - 1], "A", None)
        else:
            codes = np.rint(value.reshape(-1)).astype(np.int64)
            mapping[init.name] = (modules[int(codes[0] // CODE_STRIDE) - 1], "B", codes % CODE_STRIDE)
    return mapping


def _make_inputs(graph_dir: Path, mapping: dict) -> dict[str, list]:
    """Turn the LoRA weights into graph inputs with rank-0 defaults; returns each input's [rows, cols] dims."""
    import onnx
    from onnx import helper

    proto = read_graph(graph_dir)
    shapes = {}
    kept = []
    for init in proto.graph.initializer:
        if init.name not in mapping:
            kept.append(init)
            continue
        rows, cols = init.dims
        dims = [rows, RANK] if mapping[init.name][1] == "A" else [RANK, cols]
        shapes[init.name] = dims
        proto.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, dims))
        empty = [rows, 0] if mapping[init.name][1] == "A" else [0, cols]
        kept.append(helper.make_tensor(init.name, init.data_type, empty, []))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    onnx.save(proto, str(graph_dir / "model.onnx"))
    return shapes


def _adapter_params(adapter: Adapter, mapping: dict, shapes: dict) -> dict[str, np.ndarray]:
    params = {}
    for name, (module, side, rows) in mapping.items():
        if module not in adapter.tensors:
            continue  # the input's rank-0 default: this adapter leaves the layer alone
        ab = adapter.tensors[module]
        value = ab["A"].T if side == "A" else ab["B"][rows].T
        fixed = shapes[name][0] if side == "A" else shapes[name][1]
        if value.shape[0 if side == "A" else 1] != fixed:
            raise UsageError(f"adapter {adapter.name}: {name} would be {list(value.shape)}, the model input is "
                             f"{shapes[name]}; it was trained on a different base model")
        params[name] = np.ascontiguousarray(value, dtype=np.float32)
    return params


def _write_adapter(params: dict[str, np.ndarray], path: Path) -> None:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    fmt.export_adapter(str(path))


def generate_adapter(opts: ExtractAdaptersOptions) -> Path:
    started = time.perf_counter()
    out, ep = check_target(opts)
    if not opts.adapter_paths:
        raise UsageError("--adapter_paths is empty; give one or more adapter folders, comma-separated")
    names, precision, trust_remote_code = opts.adapter_names, opts.precision, opts.trust_remote_code
    adapters = [read_adapter(p, names[i] if names else None) for i, p in enumerate(opts.adapter_paths)]
    taken = [a.name for a in adapters]
    if len(set(taken)) < len(taken):
        raise UsageError(f"two adapters share a name ({', '.join(taken)}); name them with --adapter_names")
    base_model_path = opts.base_model_path
    base_path = resolve(base_model_path)
    base = load_model(base_path, torch.float32, trust_remote_code).eval()
    for adapter in adapters:
        shapes = {module: (ab["A"].shape[1], ab["B"].shape[0]) for module, ab in adapter.tensors.items()}
        check_layers(f"{adapter.name} ({adapter.folder})", shapes, base, base_model_path)
    # every adapter trained on the int4-rounded base: that is the reference
    rounded = {quantization_aware(a.manifest) for a in adapters} == {precision}
    if rounded:
        from slmops.models.fake_quant import fake_quantize
        fake_quantize(base)
    modules = sorted({m for a in adapters for m in a.tensors})
    work = work_dir(out)
    try:
        with tempfile.TemporaryDirectory(dir=work.parent, prefix=f".{out.name}-build-") as tmp:
            coded, probe = Path(tmp) / "coded", Path(tmp) / "fp32"
            _coded_adapter(base_path, modules, coded, trust_remote_code)
            probe.mkdir()
            build(Path(base_path), probe, "fp32", ep, {"adapter_path": str(coded)}, trust_remote_code)
            mapping = _decode(probe, modules)
            # adapter weights are inputs: they must stay unquantized
            build(Path(base_path), work, precision, ep, {**lora_kept_float(probe, coded),
                                                         **opts.quantizer(precision, trained_on_rtn=rounded)},
                  trust_remote_code)
        shapes = _make_inputs(work, mapping)
        (work / "adapters").mkdir()
        for adapter in adapters:
            _write_adapter(_adapter_params(adapter, mapping, shapes),
                           work / "adapters" / f"{adapter.name}{ADAPTER_SUFFIX}")
        results = _check_all(base, base_path, adapters, GenaiModel(work), precision, opts.parity_prompts,
                             trust_remote_code)
        parity.write(work, results)
        write_manifest(work / "manifest.json", "generate-adapter", {**opts.model_dump(), "adapter_names": taken},
                       {"base_model": base_path, "adapters": {a.name: str(a.folder) for a in adapters},
            "lora_inputs": len(mapping), "reference_base": "int4-rounded" if rounded else "float"},
            {}, {"parity": results, "size_mb": folder_mb(work),
                                               "wall_time_s": round(time.perf_counter() - started, 2)})
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    publish_checked(work, out, results, "the base model")
    log.info("wrote %s: base + %d adapter%s (%s), %.0f MB", out, len(adapters), "s"[:len(adapters) > 1],
             ", ".join(taken), folder_mb(out))
    return out


def _check_all(base: Any, base_path: str, adapters: list[Adapter], onnx: GenaiModel, precision: str,
               n: int, trust_remote_code: bool) -> list[dict]:
    """Parity of the plain base (no adapter active), then of each adapter against base + that adapter."""
    tokenizer = load_tokenizer(base_path, trust_remote_code)
    items, origin = parity.probes(tokenizer, None, n)
    base.config.use_cache = True
    results = [parity.check(base, tokenizer, onnx, precision, items, origin)]
    log.info(parity.verdict(results[0]))
    for adapter in adapters:
        model = attach_adapter(load_model(base_path, torch.float32, trust_remote_code), adapter.folder,
                               base_path).merge_and_unload().eval()
        model.config.use_cache = True
        items, origin = parity.probes(tokenizer, adapter.manifest, n)
        results.append(parity.check(model, tokenizer, onnx, precision, items, origin, adapter=adapter.name))
        log.info(parity.verdict(results[-1]))
    return results
