"""auto-opt and generate-adapter on tiny random models: the exported model answers like PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TEMPLATE, build_model, make_adapter, sentiment_rows, write_jsonl
from test_cli import fails_cleanly
from slmops.cli import main
from slmops.export import parity
from slmops import auto_opt
from slmops.errors import ParityError
from slmops.models.genai import GenaiModel
from slmops.models.loading import load_model
from slmops.models.tokenizers import load_tokenizer

PROMPTS = ["Review: good film very\nTone:", "Review: awful plot not\nTone:", "the actor was quite"]


@torch.no_grad()
def torch_greedy(base: Path, adapter: Path | None, ids: list[int], n: int = 8) -> list[int]:
    model = load_model(str(base), torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).eval()
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    qv = make_adapter(tiny_llama, root / "qv", ["q_proj", "v_proj"], 4, 1)
    every = make_adapter(tiny_llama, root / "every", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"], 8, 2)
    return qv, every


def test_auto_opt_merges_the_adapter_and_matches_pytorch(tiny_llama, adapters, tmp_path):
    out = tmp_path / "onnx"
    assert main(["auto-opt", "-m", str(tiny_llama), "--adapter_path", str(adapters[1]), "--precision", "fp32",
                 "--use_ort_genai", "-o", str(out), "--parity_prompts", "4"]) == 0
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["top1_agreement"] >= 0.99 and report["perplexity_ratio"] <= 1.01
    assert json.loads((out / "manifest.json").read_text())["resolved"]["adapter_merged"] is True
    assert not out.with_name("onnx.partial").exists()
    onnx = GenaiModel(out)
    tok = load_tokenizer(str(tiny_llama))
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        want = torch_greedy(tiny_llama, adapters[1], ids)
        assert onnx.generate(ids, 8) == want
        assert want != torch_greedy(tiny_llama, None, ids)  # the adapter changes answers, so merging it mattered


def test_int4_export_passes_its_own_gate(tiny_llama, tmp_path):
    out = tmp_path / "int4"
    assert main(["auto-opt", "-m", str(tiny_llama), "--precision", "int4", "-o", str(out),
                 "--parity_prompts", "2"]) == 0
    report = json.loads((out / "parity.json").read_text())
    assert report["thresholds"] == parity.THRESHOLDS["int4"]
    assert (out / "model.onnx").stat().st_size > 0


def test_failed_parity_is_not_published(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setitem(parity.THRESHOLDS, "fp32", {"top1_agreement": 1.01, "perplexity_ratio": 1.0})
    out = tmp_path / "strict"
    with pytest.raises(ParityError, match="not published"):
        auto_opt(output_path=str(out), model_name_or_path=str(tiny_llama), parity_prompts=2)
    assert not out.exists()
    assert json.loads((tmp_path / "strict.failed" / "parity.json").read_text())["passed"] is False


def test_parity_prompts_come_from_the_adapters_training_data(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(20))
    manifest = {"options": {"model_name_or_path": str(tiny_llama), "data_name": str(data),
                            "text_template": TEMPLATE, "train_split": "train"}}
    tok = load_tokenizer(str(tiny_llama))
    items, source = parity.probes(tok, manifest, 4)
    assert source.startswith("4 rows of") and len(items) == 4
    first = tok.decode(items[0].text)
    assert first.startswith("Review: ") and "Tone: " in first
    assert tok.decode(items[0].text[items[0].response_start:]).strip() in ("positive", "negative")


def test_parity_scores_the_datas_own_answers(tiny_llama, tmp_path):
    """Probes from a run's data carry its answers: how often each model's greedy answer is that answer."""
    out = tmp_path / "onnx"
    assert main(["auto-opt", "-m", str(tiny_llama), "--precision", "fp32", "-o", str(out),
                 "--parity_prompts", "2"]) == 0
    model, tok = load_model(str(tiny_llama), torch.float32).eval(), load_tokenizer(str(tiny_llama))
    probes = []
    for prompt in PROMPTS[:2]:
        ids = tok(prompt)["input_ids"]
        answer = torch_greedy(tiny_llama, None, ids, 3)
        wrong = [(answer[0] + 1) % len(tok)] + answer[1:]
        probes += [parity.Probe(ids, ids + answer, gold=True), parity.Probe(ids, ids + wrong, gold=True)]
    task = parity.check(model, tok, GenaiModel(out), "fp32", probes, "test")["task"]
    assert task["rows"] == 4
    assert task["response_match_pytorch"] == task["response_match_onnx"] == 0.5  # the model's answers, not the others
    assert task["response_perplexity_onnx"] == pytest.approx(task["response_perplexity_pytorch"], rel=1e-3)
    # a text's continuation is no task: the built-in prompts score none
    assert "task" not in parity.check(model, tok, GenaiModel(out), "fp32", parity.probes(tok, None, 2)[0], "b")


def test_generate_adapter_switches_adapters_per_request(tiny_llama, adapters, tmp_path):
    out = tmp_path / "multi"
    assert main(["generate-adapter", "--base_model_path", str(tiny_llama), "--adapter_paths",
                 f"{adapters[0]},{adapters[1]}", "--adapter_names", "small,big", "-o", str(out),
                 "--parity_prompts", "2"]) == 0
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["big.onnx_adapter", "small.onnx_adapter"]
    results = json.loads((out / "parity.json").read_text())
    assert [r["adapter"] for r in results] == [None, "small", "big"] and all(r["passed"] for r in results)
    onnx = GenaiModel(out)
    tok = load_tokenizer(str(tiny_llama))
    ids = tok(PROMPTS[0])["input_ids"]
    base = torch_greedy(tiny_llama, None, ids)
    assert onnx.generate(ids, 8) == base  # no adapter active: the rank-0 defaults leave the base alone
    for name, folder in (("small", adapters[0]), ("big", adapters[1])):
        want = torch_greedy(tiny_llama, folder, ids)
        assert want != base
        assert onnx.generate(ids, 8, adapter=name) == want


def test_generate_runs_onnx_folders_with_a_named_adapter(tiny_llama, adapters, tmp_path, capsys):
    out = tmp_path / "multi"
    assert main(["generate-adapter", "--base_model_path", str(tiny_llama), "--adapter_paths", str(adapters[0]),
                 "--adapter_names", "qv", "-o", str(out), "--parity_prompts", "1"]) == 0
    capsys.readouterr()
    tok = load_tokenizer(str(tiny_llama))
    want = tok.decode(torch_greedy(tiny_llama, adapters[0], tok(PROMPTS[1])["input_ids"], 6),
                      skip_special_tokens=True)
    assert main(["generate", "-m", str(out), "--adapter", "qv", "--prompt", PROMPTS[1].replace("\n", "\\n"),
                 "--max_new_tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == want.strip()


def test_evaluate_scores_onnx_like_pytorch(tiny_llama, adapters, tmp_path):
    from slmops import evaluate

    out = tmp_path / "multi"
    assert main(["generate-adapter", "--base_model_path", str(tiny_llama), "--adapter_paths", str(adapters[1]),
                 "--adapter_names", "big", "-o", str(out), "--parity_prompts", "1"]) == 0
    data = dict(data_name=str(write_jsonl(tmp_path / "d.jsonl", sentiment_rows(24))), text_template=TEMPLATE,
                metrics="accuracy,f1,perplexity", progress=False)
    for onnx_spec, torch_spec in (((str(out), None), (str(tiny_llama), None)),
                                  ((str(out), "big"), (str(tiny_llama), str(adapters[1])))):
        got, want = evaluate(*onnx_spec, **data), evaluate(*torch_spec, **data)
        assert got["backend"] == "onnx-genai" and want["backend"] == "torch"
        assert got["metrics"]["accuracy"] == want["metrics"]["accuracy"]
        assert got["metrics"]["perplexity"] == pytest.approx(want["metrics"]["perplexity"], rel=1e-3)


@pytest.fixture(scope="module")
def other_base(tokenizer_dir, tmp_path_factory) -> Path:
    """A model with other layer shapes: adapters trained on it do not fit tiny_llama."""
    import transformers
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("other") / "wide"
    tok = load_tokenizer(str(tokenizer_dir))
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_bad_input(tiny_llama, adapters, other_base, tokenizer_dir, models_root, tmp_path, capsys):
    out = tmp_path / "o"
    alien = make_adapter(other_base, tmp_path / "alien", ["q_proj"], 2, 3)
    gpt2 = build_model(tokenizer_dir, models_root, "gpt2")
    cases = [
        (["generate-adapter", "--base_model_path", str(tiny_llama), "--adapter_paths",
          f"{adapters[0]},{alien}"], "trained on a different base model"),
        (["generate-adapter", "--base_model_path", str(tiny_llama), "--adapter_paths", str(tmp_path)],
         "no adapter_config.json"),
        (["generate-adapter", "--base_model_path", str(tiny_llama)], "--adapter_paths: give one or more"),
        (["auto-opt", "-m", str(gpt2), "--exporter", "builder"], "cannot export architecture GPT2LMHeadModel"),
        (["auto-opt", "-m", str(gpt2), "--precision", "fp16"], "runs on GPUs only"),
        (["auto-opt", "-m", str(tiny_llama), "--device", "gpu"], "install onnxruntime-genai-cuda"),
        (["auto-opt", "-m", str(tiny_llama), "--provider", "CUDAExecutionProvider"], "not --device cpu"),
        (["generate", "-m", str(tmp_path), "--adapter", "x", "--prompt", "hi"], "ONNX Runtime GenAI folder"),
    ]
    for argv, expect in cases:
        fails_cleanly(capsys, [*argv, "-o", str(out)] if argv[0] != "generate" else argv, expect,
                      out if argv[0] != "generate" else None)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails_cleanly(capsys, ["auto-opt", "-m", str(tiny_llama), "-o", str(out)], "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_int4_multi_adapter_keeps_lora_inputs_float(tiny_llama, adapters, tmp_path, monkeypatch):
    import onnx

    # A random tiny model's logits are nearly flat, so int4 flips its argmax by chance; the int4 gate is
    # measured on SmolLM2 (docs/speed.md). This test is about the graph.
    monkeypatch.setitem(parity.THRESHOLDS, "int4", {"top1_agreement": 0.0, "perplexity_ratio": 2.0})
    out = tmp_path / "multi4"
    assert main(["generate-adapter", "--base_model_path", str(tiny_llama), "--adapter_paths", str(adapters[0]),
                 "--precision", "int4", "-o", str(out), "--parity_prompts", "1"]) == 0
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    lora = [i for i in graph.input if ".lora_" in i.name]
    assert len(lora) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert {i.type.tensor_type.elem_type for i in lora} == {onnx.TensorProto.FLOAT}
    assert any(n.op_type == "MatMulNBits" for n in graph.node)  # while the base is int4


@pytest.mark.parametrize("precision, algorithm", [("int4", "rtn"), ("int4", "k_quant"), ("int8", "k_quant")])
def test_quantize_keeps_the_logits_close_to_float(precision, algorithm, tiny_llama, tmp_path):
    out = tmp_path / algorithm
    assert main(["quantize", "-m", str(tiny_llama), "--precision", precision, "--algorithm", algorithm,
                 "--block_size", "16", "-o", str(out), "--parity_prompts", "4"]) == 0
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["top1_agreement"] >= 0.75 and report["perplexity_ratio"] <= 1.1
    options = json.loads((out / "manifest.json").read_text())["options"]
    assert (options["precision"], options["algorithm"], options["block_size"]) == (precision, algorithm, 16)
    import onnx
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    bits = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    blocks = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert bits == {int(precision[3:])} and blocks == {16}


def test_the_two_int4_quantizers_round_differently(tiny_llama, tmp_path):
    for algorithm in ("rtn", "k_quant"):
        assert main(["quantize", "-m", str(tiny_llama), "--algorithm", algorithm, "-o", str(tmp_path / algorithm),
                     "--parity_prompts", "1"]) == 0
    weights = [(tmp_path / a / "model.onnx.data").read_bytes() for a in ("rtn", "k_quant")]
    assert weights[0] != weights[1]  # k-quant searches scales (and zero points) where RTN takes the peak


@pytest.mark.parametrize("flags, message", [
    (["quantize", "--block_size", "48"], "--block_size must be one of 16, 32, 64, 128, 256, got 48"),
    (["quantize", "--accuracy_level", "7"], "--accuracy_level must lie in 0..4, got 7"),
    (["quantize", "--int8_layers", "everything"], "--int8_layers: unknown everything"),
    (["quantize", "--precision", "int8", "--int8_layers", "last_matmul"], "--int8_layers keeps layers of an int4"),
    (["quantize", "--precision", "fp32"], "invalid choice: 'fp32'"),
    (["quantize", "--algorithm", "gptq"], "invalid choice: 'gptq'"),
    (["auto-opt", "--precision", "fp16", "--int8_layers", "last_matmul"], "--int8_layers keeps layers of an int4"),
])
def test_wrong_quantize_settings_are_refused(flags, message, tiny_llama, tmp_path, capsys):
    assert main([*flags, "-m", str(tiny_llama), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_autoround_calibrates_on_the_users_rows(tiny_llama, sentiment_file, tmp_path):
    """AutoRound tunes the int4 rounding on the given rows; the builder packs it; the logits stay close."""
    out = tmp_path / "autoround"
    assert main(["quantize", "-m", str(tiny_llama), "--algorithm", "autoround", "-d", str(sentiment_file),
                 "--text_template", TEMPLATE, "--max_samples", "32", "--block_size", "16", "-o", str(out),
                 "--parity_prompts", "4"]) == 0
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["top1_agreement"] >= 0.75 and report["perplexity_ratio"] <= 1.1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["algorithm"] == manifest["resolved"]["algorithm"] == "autoround"
    calibration = manifest["resolved"]["calibration"]
    assert calibration["rows"] == 32 and calibration["sequences"] >= 1
    assert calibration["tokens"] >= calibration["sequences"] * calibration["sequence_length"]
    import onnx
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    quantized = {n.name for n in graph.node if n.op_type == "MatMulNBits"}
    assert any("qkv_proj" in n or "q_proj" in n for n in quantized) and any("down_proj" in n for n in quantized)
    assert main(["quantize", "-m", str(tiny_llama), "--algorithm", "rtn", "--block_size", "16",
                 "-o", str(tmp_path / "rtn"), "--parity_prompts", "1"]) == 0
    assert (out / "model.onnx.data").read_bytes() != (tmp_path / "rtn" / "model.onnx.data").read_bytes()


def test_auto_calibrates_on_the_runs_own_rows(tiny_llama, tmp_path):
    """A finetune output folder names its data: `quantize` with no algorithm given runs AutoRound on it."""
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(40))
    run = tmp_path / "run"
    assert main(["finetune", "-m", str(tiny_llama), "-d", str(data), "--text_template", TEMPLATE, "--lora_r", "4",
                 "--max_steps", "2", "-o", str(run)]) == 0
    out = tmp_path / "int4"
    assert main(["quantize", "-m", str(run), "--block_size", "16", "--max_samples", "16", "-o", str(out),
                 "--parity_prompts", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["algorithm"] == "auto" and manifest["resolved"]["algorithm"] == "autoround"
    assert manifest["resolved"]["calibration"]["rows"] == 16
    data.unlink()  # the run's rows moved away: auto falls back to k-quant rather than failing
    assert main(["quantize", "-m", str(run), "--block_size", "16", "-o", str(tmp_path / "kq"),
                 "--parity_prompts", "2"]) == 0
    assert json.loads((tmp_path / "kq" / "manifest.json").read_text())["resolved"]["algorithm"] == "k_quant"


@pytest.mark.parametrize("flags, message", [
    (["--algorithm", "autoround"], "--algorithm autoround calibrates on rows of data: pass --data_name"),
    (["--algorithm", "autoround", "--precision", "int8"], "--algorithm autoround makes int4 weights"),
    (["--algorithm", "k_quant", "-d", "rows.jsonl"], "which --algorithm k_quant does not read"),
    (["--precision", "int8", "-d", "rows.jsonl"], "which --precision int8 does not read"),
    (["--algorithm", "autoround", "-d", "rows.jsonl"], "say how to turn a calibration row into text"),
    (["--algorithm", "autoround", "-d", "missing.jsonl", "--text_template", TEMPLATE], "missing.jsonl"),
    (["--algorithm", "autoround", "-d", "empty.jsonl", "--text_template", TEMPLATE], "no rows left"),
    (["--algorithm", "autoround", "--int8_layers", "mixed_layers", "-d", "rows.jsonl", "--text_template",
      TEMPLATE], "--int8_layers mixed_layers applies to rtn and k_quant"),
])
def test_wrong_calibration_is_refused(flags, message, tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "rows.jsonl", sentiment_rows(8))
    write_jsonl(tmp_path / "empty.jsonl", [{"phrase": "", "tone": ""}] * 3)
    fails_cleanly(capsys, ["quantize", "-m", str(tiny_llama), *flags, "-o", str(tmp_path / "out")], message,
                  tmp_path / "out")
    assert not list(tmp_path.glob(".out*"))


def test_generate_adapter_refuses_autoround(tiny_llama, adapters, tmp_path, capsys):
    assert main(["generate-adapter", "-m", str(tiny_llama), "--adapter_paths", str(adapters[0]), "--precision",
                 "int4", "--algorithm", "autoround", "-o", str(tmp_path / "out")]) == 2
    assert "generate-adapter keeps the adapters beside one base" in capsys.readouterr().err


def test_quantize_takes_an_exported_folder_from_its_source(tiny_llama, adapters, tmp_path, capsys):
    """An auto-opt folder names its source: quantize exports that again (the builder rounds the PyTorch
    weights, parity compares with PyTorch); a folder that names none is refused with the fix."""
    fp32 = tmp_path / "fp32"
    assert main(["auto-opt", "-m", str(tiny_llama), "-a", str(adapters[0]), "-o", str(fp32),
                 "--parity_prompts", "1"]) == 0
    out = tmp_path / "int4"
    assert main(["quantize", "-m", str(fp32), "--algorithm", "k_quant", "--block_size", "16", "-o", str(out),
                 "--parity_prompts", "2"]) == 0
    resolved = json.loads((out / "manifest.json").read_text())["resolved"]
    assert (resolved["base_model"], resolved["adapter"], resolved["algorithm"]) == (
        str(tiny_llama), str(adapters[0]), "k_quant")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "genai_config.json").write_text("{}")
    fails_cleanly(capsys, ["quantize", "-m", str(foreign), "-o", str(tmp_path / "x")],
                  "without the auto-opt manifest that names its source", tmp_path / "x")
    fails_cleanly(capsys, ["quantize", "-m", str(fp32), "-a", str(adapters[1]), "-o", str(tmp_path / "x")],
                  "--adapter_path goes with a PyTorch model", tmp_path / "x")
