"""`slmops run --config`: Olive's config shape, validation, the pass cache, --dry_run and --setup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import build_model, sentiment_rows, write_jsonl
from slmops.cli import main

# SPEC.md's example, verbatim but for the model path and the data file.
SEED = """
model:
  type: PyTorchModel
  config: {model_path: "MODEL", task: "text-generation"}
data_configs:
  - name: custom_dataset
    type: HuggingfaceContainer
    load_dataset_config: {data_files: "DATA", split: "train"}
    pre_process_data_config: {text_template: "User: {input}\\nAssistant: {output}"}
passes:
  lora:
    type: LoRA
    config: {r: 16, lora_alpha: 32, lora_dropout: 0.1, weight_decay: 0.01,
             target_modules: ["c_attn", "c_proj"], modules_to_save: ["ln_f", "lm_head"]}
"""


@pytest.fixture(scope="module")
def tiny_gpt2(tokenizer_dir, models_root) -> Path:
    return build_model(tokenizer_dir, models_root, "gpt2")


@pytest.fixture
def io_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "dataset.json", [{"input": r["phrase"], "output": r["tone"]}
                                                   for r in sentiment_rows(40)])


def write_config(path: Path, text: str, **swap: str) -> Path:
    for old, new in swap.items():
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")
    return path


def fails(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


def test_seed_example_runs_then_reuses_done_passes(tiny_gpt2, io_file, tmp_path, capsys, caplog):
    config = write_config(tmp_path / "olive-config.yaml", SEED + "  max_steps: 2\n".replace("  max", "    max"),
                          MODEL=str(tiny_gpt2), DATA=str(io_file))
    cfg = yaml.safe_load(config.read_text())
    cfg["passes"]["lora"]["config"]["max_steps"] = 2
    cfg["output_dir"] = str(tmp_path / "run")
    config.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(config)]) == 0
    folder = tmp_path / "run" / "lora"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["options"]["lora_r"] == 16 and manifest["options"]["target_modules"] == ["c_attn", "c_proj"]
    assert manifest["resolved"]["training_args"]["weight_decay"] == 0.01
    assert manifest["results"]["global_step"] == 2
    adapter_cfg = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_cfg["modules_to_save"]) == {"ln_f", "lm_head"}
    record = json.loads((folder / "pass.json").read_text())
    stamp = (folder / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns

    capsys.readouterr()
    assert main(["run", "--config", str(config)]) == 0  # unchanged: nothing re-runs
    assert (folder / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    run = json.loads((tmp_path / "run" / "workflow.json").read_text())
    assert run["passes"][0]["ran"] is False and run["passes"][0]["key"] == record["key"]

    cfg["passes"]["lora"]["config"]["r"] = 8  # a changed pass re-runs
    config.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(config), "--dry_run"]) == 0
    assert "run " in capsys.readouterr().out
    assert main(["run", "--config", str(config)]) == 0
    assert json.loads((folder / "manifest.json").read_text())["options"]["lora_r"] == 8
