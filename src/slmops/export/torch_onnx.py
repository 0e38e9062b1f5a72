"""The fallback exporter: torch.onnx for decoder architectures the model builder does not know.

The graph takes and returns the KV cache under the names onnxruntime-genai's generic `decoder` model
type reads (input_ids, attention_mask, position_ids, past_key_values.N.key/value -> logits,
present.N.key/value), so the folder loads, decodes and is parity-checked exactly like a builder folder.
Only the KV cache's shape is read from the model (one probe forward), not its architecture, which is
why GPT-2, GPT-NeoX, OPT, Falcon, GPT-J or StableLM all go through the same code. Weights are quantized
after export with onnxruntime's MatMulNBits quantizer at the builder's settings (blocks of 32,
symmetric, accuracy level 4 on CPU), so int4/int8 mean the same thing whichever exporter ran.
The builder remains the first choice: it fuses attention, rotary and norms, which this graph does not.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from slmops.artifacts.folders import write_json
from slmops.errors import UsageError, first_line
from slmops.export.builder import output_to

log = logging.getLogger(__name__)

OPSET = 18


def cache_layout(model: nn.Module) -> tuple[int, int, int]:
    """(layers, KV heads, head size) of the cache the model fills; refuses models without a
    key/value cache per layer (state-space and hybrid models)."""
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([[0, 0]]), use_cache=True).past_key_values
    layers = getattr(cache, "layers", None)
    keys = [getattr(layer, "keys", None) for layer in layers or []]
    if not keys or any(k is None or k.dim() != 4 for k in keys):
        raise UsageError(f"{type(model).__name__} keeps no per-layer key/value cache that ONNX Runtime GenAI "
                         f"can hold; neither the model builder nor torch.onnx can export it for generation")
    return len(keys), keys[0].shape[1], keys[0].shape[3]


class DecoderWithCache(nn.Module):
    """The model with its KV cache as flat tensors in and out, the form the ONNX graph needs."""

    def __init__(self, model: nn.Module, layers: int, positions: bool):
        super().__init__()
        self.model, self.layers, self.positions = model, layers, positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor):
        from transformers import DynamicCache

        position_ids, past = (rest[0], rest[1:]) if self.positions else (None, rest)
        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        extra = {"position_ids": position_ids} if self.positions else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                         use_cache=True, **extra)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def export(model: nn.Module, tokenizer: Any, out_dir: Path, precision: str, ep: str, block_size: int = 32,
           accuracy_level: int | None = None) -> None:
    """Write model.onnx (+ .data), genai_config.json and the tokenizer files into `out_dir`; int4/int8 by
    round-to-nearest in blocks of `block_size`."""
    if precision == "fp16" and ep == "cpu":
        raise UsageError("--precision fp16 with the torch.onnx exporter runs on GPUs only (ONNX Runtime's CPU "
                         "kernels lack float16); use fp32, int8 or int4 on cpu")
    layers, kv_heads, head_size = cache_layout(model)
    positions = "position_ids" in inspect.signature(model.forward).parameters
    names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", *(["position_ids"] if positions else []), *names]
    outputs = ["logits", *[n.replace("past_key_values", "present") for n in names]]
    batch, seq, total = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("total")
    past = torch.export.Dim("past", min=0)
    example = [torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)]
    rest_shapes: list[dict] = []
    if positions:
        example.append(torch.arange(2, 5).expand(2, 3))
        rest_shapes.append({0: batch, 1: seq})
    example += [torch.zeros(2, kv_heads, 2, head_size) for _ in names]
    rest_shapes += [{0: batch, 2: past}] * len(names)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total}, "rest": tuple(rest_shapes)}
    path = out_dir / "model.onnx"
    try:
        with torch.no_grad(), output_to(out_dir / "build.log"), quiet_loggers("torch.onnx", "torch.export"):
            torch.onnx.export(DecoderWithCache(model, layers, positions), tuple(example), str(path),
                              input_names=inputs, output_names=outputs, dynamic_shapes=shapes, dynamo=True,
                              opset_version=OPSET, external_data=True, verbose=False)
    except Exception as err:
        raise UsageError(f"torch.onnx could not export {type(model).__name__} for generation "
                         f"({first_line(err)[:300]})") from None
    if precision in ("int4", "int8"):
        quantize(path, int(precision[3:]), ep, block_size, accuracy_level)
    elif precision == "fp16":
        to_fp16(path)
    write_genai_config(model, out_dir, layers, kv_heads, head_size, positions)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """torch's exporter warns through handlers made at import (missing torchvision ops and the like)."""
    loggers = [logging.getLogger(n) for n in names] if log.getEffectiveLevel() > logging.DEBUG else []
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.ERROR))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def quantize(path: Path, bits: int, ep: str, block_size: int = 32, accuracy_level: int | None = None) -> None:
    """MatMulNBits weights in place, as the builder quantizes (its Gemm nodes become MatMul + Add first)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto = onnx.load(str(path))
    gemm_to_matmul(proto)
    if accuracy_level is None:
        accuracy_level = 4 if ep == "cpu" else None
    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level)
    quantizer.process()
    save(quantizer.model.model, path)


def gemm_to_matmul(proto: Any) -> None:
    """Put every constant weight where the quantizer looks: MatMul(A, initializer). Gemm(A, W, C)
    becomes MatMul + Add, and a transposed initializer (a head tied to the embedding) a transposed copy."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    transposes = {n.output[0]: n.input[0] for n in proto.graph.node
                  if n.op_type == "Transpose" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2}

    def transposed(name: str) -> str:
        copy = f"{name}_transposed"
        if copy not in inits:
            inits[copy] = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[name]).T), copy)
            proto.graph.initializer.append(inits[copy])
        return copy

    nodes = []
    for node in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMul" and node.input[1] in transposes:
            nodes.append(helper.make_node("MatMul", [node.input[0], transposed(transposes[node.input[1]])],
                                          list(node.output), name=node.name))
            continue
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        weight = transposed(node.input[1]) if attrs.get("transB", 0) else node.input[1]
        product = node.output[0] if len(node.input) < 3 else f"{node.name}_matmul"
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}_MatMul"))
        if len(node.input) == 3:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_Add"))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def to_fp16(path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=False), path)


def save(proto: Any, path: Path) -> None:
    """onnx_ir's writer: onnx.save refuses when a file named like the weights exists in the *working* folder."""
    import onnx_ir

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx_ir.save(onnx_ir.from_proto(proto), path, external_data=data.name)


def write_genai_config(model: nn.Module, out_dir: Path, layers: int, kv_heads: int, head_size: int,
                       positions: bool) -> None:
    config = model.config
    context = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "seq_length")
                    if isinstance(getattr(config, k, None), int)), 2048)
    eos = config.eos_token_id
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              **({"position_ids": "position_ids"} if positions else {}),
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    genai = {
        "model": {
            "type": "decoder", "context_length": context, "vocab_size": config.vocab_size,
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else eos,
            "eos_token_id": eos, "pad_token_id": config.pad_token_id if config.pad_token_id is not None else eos,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx", "head_size": head_size, "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads, "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads, "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        # The graph concatenates past and new keys, so the cache cannot be one shared buffer.
        "search": {"max_length": context, "past_present_share_buffer": False, "do_sample": False, "num_beams": 1,
                   "num_return_sequences": 1, "top_k": 50, "top_p": 1.0, "temperature": 1.0,
                   "repetition_penalty": 1.0, "early_stopping": True, "min_length": 0},
    }
    write_json(out_dir / "genai_config.json", genai)
