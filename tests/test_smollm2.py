"""Real SmolLM2-135M-Instruct end to end (slow: conversion ~45 s on first use, training ~1 min)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmops.cli import main

pytestmark = pytest.mark.slow

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.jsonl"
TEMPLATE = "<|im_start|>user\\n{phrase}<|im_end|>\\n<|im_start|>assistant\\n{tone}<|im_end|>"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from slmops.models import catalog
    return catalog.pull("smollm2-135m-instruct")


def test_converted_tokenizer_matches_gguf_and_keeps_special_tokens(smollm2, tmp_path):
    from transformers import AutoTokenizer

    from slmops.models import catalog
    from slmops.models.tokenizers import prepare_tokenizer
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert (tok.eos_token, tok.bos_token, tok.padding_side) == ("<|im_end|>", "<|im_start|>", "right")
    assert tok.pad_token_id is not None and "<|im_start|>assistant" in tok.chat_template
    assert tok.convert_ids_to_tokens(tok("hello world")["input_ids"]) == ["hello", "Ġworld"]
    gguf = catalog._find_gguf(catalog.CATALOG["smollm2-135m-instruct"], tmp_path)
    original = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    catalog.check_tokenizer_roundtrip(prepare_tokenizer(original), smollm2)


@pytest.mark.skipif(not SST2.exists(), reason="needs ../shared/data/sst2")
def test_finetune_and_generate_sst2(smollm2, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", "-m", "smollm2-135m-instruct", "-d", str(SST2), "--train_split", "train[:96]",
                 "--text_template", TEMPLATE, "--max_steps", "6", "--per_device_train_batch_size", "16",
                 "-o", str(out), "--logging_steps", "1"]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [r["loss"] for r in records if "loss" in r]
    assert len(curve) == 6 and curve[-1] < curve[0]
    capsys.readouterr()
    assert main(["generate", "--adapter_path", str(out), "--prompt", "a gorgeous, witty film", "--chat",
                 "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


DEV = SST2.with_name("dev.jsonl")


@pytest.mark.skipif(not DEV.exists(), reason="needs ../shared/data/sst2")
def test_evaluate_agrees_with_the_independent_scorer(smollm2, tmp_path):
    """`slmops evaluate` against benchmarks/sst2_accuracy.py (plain transformers) on the first 96 dev rows."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sst2_accuracy", Path(__file__).resolve().parents[1] / "benchmarks" / "sst2_accuracy.py")
    scorer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scorer)
    out = tmp_path / "results.json"
    assert main(["evaluate", "-m", "smollm2-135m-instruct", "-d", str(DEV), "--text_template", TEMPLATE,
                 "--max_samples", "96", "--log_level", "2", "-o", str(out)]) == 0
    ours = json.loads(out.read_text())["metrics"]["accuracy"]
    tok, model = scorer.load(str(smollm2), None)
    assert ours == pytest.approx(scorer.accuracy(tok, model, scorer.read_rows(str(DEV), 0, 96)), abs=1 / 96)


@pytest.mark.skipif(not SST2.exists(), reason="needs ../shared/data/sst2")
def test_quickstart_adapter_exported_and_served(smollm2, tmp_path):
    """The README's chain on the real model: fine-tune, export with generate-adapter, serve the PyTorch
    adapter and the export; the openai client gets the same answers from both, streamed and whole."""
    openai = pytest.importorskip("openai")
    from test_serve import server

    ft, onnx = tmp_path / "sst2-lora", tmp_path / "sst2-onnx"
    assert main(["finetune", "-m", "smollm2-135m-instruct", "-d", str(SST2), "--train_split", "train[:640]",
                 "--text_template", TEMPLATE, "--method", "lora", "--max_steps", "40",
                 "--per_device_train_batch_size", "16", "-o", str(ft)]) == 0
    assert main(["generate-adapter", "-m", "smollm2-135m-instruct", "--adapter_paths", str(ft),
                 "--adapter_names", "tone", "-o", str(onnx)]) == 0
    base, reviews = "smollm2-135m-instruct", ["a gorgeous, witty, seductive movie", "dull, lifeless and far too long"]
    answers = {}
    for runtime, args in (("pytorch", [base, "--adapters", f"tone={ft}"]), ("onnx", [str(onnx), "--served_model_name", base])):
        with server(*args) as (url, _):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
            assert sorted(m.id for m in client.models.list().data) == [base, "tone"]
            for model in (base, "tone"):
                for review in reviews:
                    ask = {"model": model, "messages": [{"role": "user", "content": review}], "max_tokens": 4,
                           "temperature": 0}
                    whole = client.chat.completions.create(**ask).choices[0].message.content
                    chunks = client.chat.completions.create(**ask, stream=True)
                    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
                    answers[runtime, model, review] = whole
    assert [answers["pytorch", "tone", r] for r in reviews] == ["positive", "negative"]
    assert {k[1:]: v for k, v in answers.items() if k[0] == "onnx"} == {k[1:]: v for k, v in answers.items()
                                                                        if k[0] == "pytorch"}
    assert answers["pytorch", base, reviews[0]] != "positive"  # the base answers in words: the adapter made the labels
