"""The `olive finetune` invocations from SPEC.md, flag for flag, with model and data swapped for tiny ones."""

from __future__ import annotations

import json

import pytest

from conftest import sentiment_rows, write_jsonl
from slmops.cli import main

LLAMA3_TEMPLATE = ("<|start_header_id|>user<|end_header_id|>\\n{phrase}<|eot_id|><|start_header_id|>assistant"
                   "<|end_header_id|>\\n{tone}")


@pytest.fixture
def codes(tmp_path):
    rows = [{"programming_language": "python", "prompt": r["phrase"], "response": r["tone"]} for r in sentiment_rows(40)]
    return write_jsonl(tmp_path / "tiny-codes.jsonl", rows)


def test_llama_lora_example(tiny_llama, sentiment_file, tmp_path):
    out = tmp_path / "models/llama/ft"
    assert main(["finetune", "--model_name_or_path", str(tiny_llama), "--trust_remote_code", "--output_path", str(out),
                 "--data_name", str(sentiment_file), "--text_template", LLAMA3_TEMPLATE, "--method", "lora",
                 "--max_steps", "3", "--log_level", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["trust_remote_code"] is True and manifest["results"]["global_step"] == 3


def test_qlora_tiny_codes_example(tiny_llama, codes, tmp_path):
    out = tmp_path / "adapters/tiny-codes"
    assert main(["finetune", "--method", "qlora", "--model_name_or_path", str(tiny_llama), "--data_name", str(codes),
                 "--train_split", "train[:32]", "--eval_split", "train[32:40]",
                 "--text_template", "### Language: {programming_language} \\n### Question: {prompt} \\n### Answer: {response}",
                 "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16",
                 "--max_steps", "4", "--logging_steps", "2", "--output_path", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["train"]["rows"] == 32 and manifest["data"]["eval"]["rows"] == 8
    assert manifest["resolved"]["training_args"]["per_device_eval_batch_size"] == 16


def test_monitoring_flags_example(tiny_llama, sentiment_file, tmp_path):
    out, logs = tmp_path / "ft", tmp_path / "logs"
    assert main(["finetune", "-m", str(tiny_llama), "-d", str(sentiment_file), "--text_template", "{phrase} => {tone}",
                 "-o", str(out), "--max_steps", "4", "--logging_steps", "1", "--eval_steps", "2", "--save_steps", "2",
                 "--logging_dir", str(logs), "--report_to", "tensorboard"]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]  # 0: the untrained model, for before->after
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert any(p.name.startswith("events.out.tfevents") for p in logs.rglob("*"))


def test_memory_saving_qlora_example(tiny_llama, sentiment_file, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", "--method", "qlora", "--gradient_checkpointing", "true",
                 "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "16",
                 "-m", str(tiny_llama), "-d", str(sentiment_file), "--text_template", "{phrase} => {tone}",
                 "-o", str(out), "--max_steps", "2"]) == 0
    ta = json.loads((out / "manifest.json").read_text())["resolved"]["training_args"]
    assert ta["gradient_checkpointing"] is True and ta["gradient_accumulation_steps"] == 16
