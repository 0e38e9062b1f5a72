"""`finetune --quantization_aware int4`: the adapter trains on the weights the int4 export holds, and
`auto-opt --precision int4` keeps it in float beside the int4 base."""

from __future__ import annotations

import json

import numpy as np
import torch

from conftest import TEMPLATE
from test_cli import fails_cleanly
from slmops.cli import main
from slmops.models.fake_quant import int4_round_trip
from slmops.models.loading import load_model


def dequantize(folder, name: str) -> torch.Tensor:
    """A MatMulNBits weight of an exported model, back in float (out, in)."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx.load(str(folder / "model.onnx")).graph.initializer}
    q = numpy_helper.to_array(inits[f"{name}.weight_Q4"])
    scales = numpy_helper.to_array(inits[f"{name}.weight_scales"])
    values = np.stack([q & 0x0F, q >> 4], -1).reshape(q.shape[0], q.shape[1], -1).astype(np.float32)
    return torch.from_numpy(((values - 8) * scales[..., None]).reshape(q.shape[0], -1))


def test_round_trip_is_what_the_int4_export_holds(tiny_llama, tmp_path):
    out = tmp_path / "int4"
    assert main(["auto-opt", "-m", str(tiny_llama), "--precision", "int4", "--algorithm", "rtn", "-o", str(out),
                 "--parity_prompts", "1"]) == 0
    model = load_model(str(tiny_llama), torch.float32)
    for layer in range(2):
        for onnx_name, module in ((f"model.layers.{layer}.attn.o_proj.MatMul", model.model.layers[layer].self_attn.o_proj),
                                  (f"model.layers.{layer}.mlp.down_proj.MatMul", model.model.layers[layer].mlp.down_proj)):
            exported = dequantize(out, onnx_name)[:, :module.in_features]
            mine = int4_round_trip(module.weight.detach())
            assert (exported == mine).float().mean() > 0.999  # rounding ties may differ, nothing else
            assert not torch.equal(mine, module.weight)


def test_aware_adapter_exports_beside_an_int4_base(tiny_llama, sentiment_file, tmp_path):
    import onnx

    run, out = tmp_path / "qa", tmp_path / "onnx"
    assert main(["finetune", "-m", str(tiny_llama), "-d", str(sentiment_file), "--text_template", TEMPLATE,
                 "--quantization_aware", "int4", "--lora_r", "4", "--max_steps", "3", "-o", str(run)]) == 0
    assert json.loads((run / "manifest.json").read_text())["options"]["quantization_aware"] == "int4"
    assert main(["auto-opt", "-m", str(run), "--precision", "int4", "-o", str(out), "--parity_prompts", "4"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolved"]["adapter_float_beside_int4_base"] is True
    assert manifest["resolved"]["adapter_merged"] is False
    nodes = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    lora = [n for n in nodes if "/lora_A/" in n.name or "/lora_B/" in n.name]
    assert lora and all(n.op_type == "MatMul" for n in lora)  # the adapter stays float
    assert any(n.op_type == "MatMulNBits" for n in nodes)   # the base is int4
    report = json.loads((out / "parity.json").read_text())
    # the reference is the weights the adapter trained on, which the export holds: float-level agreement
    assert report["passed"] and report["top1_agreement"] >= 0.99
    # the run's own data is known: its answers are scored through both models
    assert report["task"]["rows"] == 4 and 0 <= report["task"]["response_match_onnx"] <= 1


def test_aware_training_refuses_merge_and_full(tiny_llama, sentiment_file, tmp_path, capsys):
    argv = ["finetune", "-m", str(tiny_llama), "-d", str(sentiment_file), "--text_template", TEMPLATE,
            "--quantization_aware", "int4", "-o", str(tmp_path / "x")]
    fails_cleanly(capsys, argv + ["--merge"], "merging into float weights undoes")
    fails_cleanly(capsys, argv + ["--method", "full"], "--method full has no such base")


def test_generate_adapter_checks_aware_adapters_against_the_rounded_base(tiny_llama, sentiment_file, tmp_path):
    run, out = tmp_path / "qa", tmp_path / "multi"
    assert main(["finetune", "-m", str(tiny_llama), "-d", str(sentiment_file), "--text_template", TEMPLATE,
                 "--quantization_aware", "int4", "--lora_r", "4", "--max_steps", "2", "-o", str(run)]) == 0
    assert main(["generate-adapter", "--base_model_path", str(tiny_llama), "--adapter_paths", str(run),
                 "--precision", "int4", "-o", str(out), "--parity_prompts", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolved"]["reference_base"] == "int4-rounded"
    assert all(r["passed"] for r in json.loads((out / "parity.json").read_text()))
