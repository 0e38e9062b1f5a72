"""onnxruntime-genai's model builder (the exporter Olive uses), called in-process and kept quiet."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

from slmops.errors import UsageError, first_line
from slmops.options.export_options import PROVIDERS

log = logging.getLogger(__name__)


class UnsupportedArchitecture(UsageError):
    """The builder has no recipe for this architecture (auto-opt then exports with torch.onnx)."""


def check_provider(provider: str, device: str) -> str:
    """The builder's name for `provider`; refuses one this machine cannot run (parity needs to run it)."""
    if provider not in PROVIDERS:
        raise UsageError(f"--provider {provider}: unknown; choose one of {', '.join(PROVIDERS)}")
    ep, provider_device, package = PROVIDERS[provider]
    if provider_device != device:
        raise UsageError(f"--provider {provider} runs on {provider_device}, not --device {device}; "
                         f"change one of them")
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise UsageError("onnxruntime-genai is not installed; pip install onnxruntime-genai") from None
    available = {"cpu": True, "cuda": og.is_cuda_available(), "dml": og.is_dml_available()}[ep]
    if not available:
        raise UsageError(f"--provider {provider} is not available in the installed onnxruntime-genai; "
                         f"install {package}, or use --device cpu --provider CPUExecutionProvider")
    return ep


def build(hf_dir: Path, out_dir: Path, precision: str, ep: str, options: dict[str, str],
          trust_remote_code: bool = False) -> None:
    """Write model.onnx, genai_config.json and the tokenizer files for the model in `hf_dir`."""
    from onnxruntime_genai.models import builder

    extra = [f"{k}={v}" for k, v in {"hf_remote": str(trust_remote_code).lower(), "hf_token": "false",
                                     **options}.items()]
    cache = out_dir / ".builder-cache"
    with output_to(out_dir / "build.log"):
        try:
            parsed = builder.parse_extra_options(None, str(hf_dir), str(out_dir), precision, ep, str(cache), extra)
            builder.create_model(None, str(hf_dir), str(out_dir), precision, ep, str(cache), **parsed)
        except NotImplementedError as err:
            raise UnsupportedArchitecture(_unsupported(hf_dir, err)) from None
    _remove_tree(cache)


@contextlib.contextmanager
def output_to(log_path: Path) -> Iterator[None]:
    """Exporters print pages of progress: into `log_path`, unless --log_level asks for debug."""
    if log.getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    with open(log_path, "w", encoding="utf-8") as sink, contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        yield


def _unsupported(hf_dir: Path, err: Exception) -> str:
    import json

    arch = (json.loads((hf_dir / "config.json").read_text()).get("architectures") or ["?"])[0]
    return (f"the ONNX model builder cannot export architecture {arch} ({first_line(err)}); it supports the "
            f"Llama, Mistral, Qwen, Phi, Gemma, SmolLM3, Granite, OLMo, Nemotron and ChatGLM families")


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def lora_kept_float(probe: Path, adapter: Path) -> dict[str, str]:
    """Builder options that put `adapter` in the graph as separate LoRA MatMuls and keep those out of
    quantization; `probe` is an fp32 build with the same adapter, which names them."""
    return {"adapter_path": str(adapter), "nodes_to_exclude": ",".join(lora_weights(read_graph(probe)).values())}


def read_graph(graph_dir: Path) -> Any:
    import onnx

    return onnx.load(str(graph_dir / "model.onnx"), load_external_data=False)


def lora_weights(proto: Any) -> dict[str, str]:
    """ONNX weight initializer -> the LoRA MatMul node using it."""
    inits = {i.name for i in proto.graph.initializer}
    return {n.input[1]: n.name for n in proto.graph.node
            if n.op_type == "MatMul" and ("/lora_A/" in n.name or "/lora_B/" in n.name) and n.input[1] in inits}
