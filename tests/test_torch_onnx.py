"""The torch.onnx fallback: architectures the model builder lacks still export, decode and pass parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TEMPLATE, build_model, sentiment_rows, write_jsonl
from slmops.cli import main
from slmops.export import parity
from slmops.models.genai import GenaiModel
from slmops.models.tokenizers import load_tokenizer
from test_cli import fails_cleanly
from conftest import make_adapter
from test_export import PROMPTS, torch_greedy


@pytest.fixture(scope="module")
def gpt2(tokenizer_dir, models_root) -> Path:
    return build_model(tokenizer_dir, models_root, "gpt2")


def exported(out: Path) -> tuple[dict, dict]:
    return json.loads((out / "manifest.json").read_text()), json.loads((out / "parity.json").read_text())


def test_gpt2_with_adapter_exports_through_torch_onnx(gpt2, tmp_path):
    adapter = make_adapter(gpt2, tmp_path / "lora", ["c_attn", "c_fc"], 4, 3)  # Conv1D layers
    out = tmp_path / "onnx"
    assert main(["auto-opt", "-m", str(gpt2), "-a", str(adapter), "-o", str(out), "--parity_prompts", "4"]) == 0
    manifest, check = exported(out)
    assert manifest["resolved"]["exporter"] == "torch.onnx" and manifest["resolved"]["adapter_merged"]
    assert check["passed"] and check["top1_agreement"] == 1.0 and check["greedy_equal"] == "4/4"
    config = json.loads((out / "genai_config.json").read_text())["model"]
    assert config["type"] == "decoder" and "position_ids" in config["decoder"]["inputs"]
    # Decoding through onnxruntime_genai, token by token with the cache, gives the merged model's tokens.
    tok = load_tokenizer(str(gpt2))
    onnx = GenaiModel(out)
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        new = onnx.generate(ids, 8)
        assert new and new == torch_greedy(gpt2, adapter, ids)[:len(new)]


def test_int4_quantizes_every_weight_matmul_including_the_tied_head(gpt2, tmp_path, monkeypatch):
    import onnx

    # A random tiny model's logits are nearly flat: int4 flips argmaxes by chance. This test is about the graph.
    monkeypatch.setitem(parity.THRESHOLDS, "int4", {"top1_agreement": 0.0, "perplexity_ratio": 2.0})
    out = tmp_path / "int4"
    assert main(["auto-opt", "-m", str(gpt2), "--precision", "int4", "-o", str(out), "--parity_prompts", "2"]) == 0
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    quantized = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(quantized) == 2 * 4 + 1  # per layer: c_attn, c_proj, c_fc, mlp c_proj; plus the LM head
    assert {a.name: a.i for a in quantized[0].attribute}["block_size"] == 32
    assert not [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    assert exported(out)[0]["resolved"]["exporter"] == "torch.onnx"


def test_exporter_torch_on_a_builder_architecture(tiny_llama, tmp_path):
    # Llama with grouped KV heads and rotary positions, through torch.onnx instead of the builder.
    out = tmp_path / "llama"
    assert main(["auto-opt", "-m", str(tiny_llama), "--exporter", "torch", "-o", str(out),
                 "--parity_prompts", "4"]) == 0
    manifest, check = exported(out)
    assert manifest["resolved"]["exporter"] == "torch.onnx" and check["passed"] and check["greedy_equal"] == "4/4"
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["num_key_value_heads"] == 2


OTHER_DECODERS = {  # architectures the builder lacks, each with its own take on positions and the cache
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=256)),  # partial rotary
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=256, word_embed_proj_dim=64)),  # learned positions, offset 2
    "falcon": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=False)),  # one shared KV head
}


@pytest.mark.parametrize("family", list(OTHER_DECODERS))
def test_other_decoders_export_and_decode_like_pytorch(family, tokenizer_dir, models_root, tmp_path, monkeypatch):
    import conftest

    monkeypatch.setitem(conftest.FAMILIES, family, OTHER_DECODERS[family])
    model = build_model(tokenizer_dir, models_root, family)
    out = tmp_path / family
    assert main(["auto-opt", "-m", str(model), "-o", str(out), "--parity_prompts", "3"]) == 0
    manifest, check = exported(out)
    assert manifest["resolved"]["exporter"] == "torch.onnx"
    assert check["top1_agreement"] == 1.0 and check["greedy_equal"] == "3/3"


def test_a_model_without_a_kv_cache_is_refused_in_one_line(tokenizer_dir, models_root, tmp_path, capsys,
                                                           monkeypatch):
    import conftest

    monkeypatch.setitem(conftest.FAMILIES, "mamba", ("MambaConfig", dict(hidden_size=64, num_hidden_layers=2,
                                                                          state_size=8)))
    out = tmp_path / "o"
    mamba = build_model(tokenizer_dir, models_root, "mamba")  # a state-space model: neither exporter serves it
    fails_cleanly(capsys, ["auto-opt", "-m", str(mamba), "-o", str(out)], "keeps no per-layer key/value cache", out)


@pytest.mark.parametrize("algorithm", ["k_quant", "autoround"])
def test_the_builders_quantizers_are_refused_where_torch_onnx_exports(algorithm, gpt2, tmp_path, capsys):
    """torch.onnx rounds with RTN only: a named algorithm that needs the builder is refused in one line, even
    after AutoRound has run (it handles GPT-2; the builder does not)."""
    rows = write_jsonl(tmp_path / "rows.jsonl", sentiment_rows(16))
    calibration = ["-d", str(rows), "--text_template", TEMPLATE] if algorithm == "autoround" else []
    out = tmp_path / "out"
    fails_cleanly(capsys, ["quantize", "-m", str(gpt2), "--algorithm", algorithm, *calibration, "-o", str(out)],
                  f"--algorithm {algorithm}: the ONNX model builder cannot export architecture GPT2", out)
