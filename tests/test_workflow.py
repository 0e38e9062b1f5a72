"""`slmops run --config`: Olive's config shape, validation, the pass cache, --dry_run and --setup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import build_model, sentiment_rows, write_jsonl
from slmops.cli import main
from slmops.errors import UsageError
from slmops.workflow.engine import run_workflow
from slmops.workflow.reading import validate

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
    config = write_config(tmp_path / "olive-config.yaml", SEED, MODEL=str(tiny_gpt2), DATA=str(io_file))
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


TEMPLATE = "Review: {phrase}\\nTone: {tone}"


def chain(model: Path, data: Path, out: Path, **extra) -> dict:
    return {"model": {"type": "HfModel", "config": {"model_path": str(model)}},
            "data_configs": [{"name": "reviews", "type": "HuggingfaceContainer",
                              "load_dataset_config": {"data_files": str(data), "split": "train"},
                              "pre_process_data_config": {"text_template": TEMPLATE.replace("\\\\", "\\")}}],
            "passes": {"lora": {"type": "LoRA", "r": 4, "max_steps": 2},  # settings beside type: Olive allows it
                       "merge": {"type": "MergeAdapterWeights"},
                       "onnx": {"type": "ModelBuilder", "config": {"precision": "fp32", "parity_prompts": 2}},
                       "score": {"type": "Evaluate", "config": {"metrics": ["accuracy"], "max_samples": 8}}},
            "output_dir": str(out), **extra}


def test_a_later_pass_with_a_missing_data_file_is_refused_before_the_first_runs(tiny_llama, sentiment_file,
                                                                                 tmp_path):
    out = tmp_path / "run"
    cfg = chain(tiny_llama, sentiment_file, out)
    cfg["data_configs"].append({"name": "held", "type": "HuggingfaceContainer",
                                "load_dataset_config": {"data_files": str(tmp_path / "typo.jsonl")},
                                "pre_process_data_config": cfg["data_configs"][0]["pre_process_data_config"]})
    cfg["passes"]["score"]["config"]["data_config"] = "held"
    with pytest.raises(UsageError, match="data file not found: .*typo.jsonl"):
        run_workflow(validate(cfg))
    assert not (out / "lora").exists()


def ran(out: Path) -> dict[str, bool]:
    return {p["name"]: p["ran"] for p in json.loads((out / "workflow.json").read_text())["passes"]}


def test_chain_finetune_merge_export_evaluate_and_partial_reruns(tiny_llama, sentiment_file, tmp_path):
    out = tmp_path / "run"
    cfg = chain(tiny_llama, sentiment_file, out)
    config = tmp_path / "flow.json"
    config.write_text(json.dumps(cfg))
    assert main(["run", "--config", str(config)]) == 0
    assert ran(out) == {"lora": True, "merge": True, "onnx": True, "score": True}
    assert (out / "merge" / "config.json").exists() and (out / "onnx" / "genai_config.json").exists()
    parity = json.loads((out / "onnx" / "parity.json").read_text())
    assert parity["passed"] if "passed" in parity else all(r["passed"] for r in parity["results"])
    results = json.loads((out / "score" / "results.json").read_text())
    assert results["backend"].lower().startswith("onnx") and results["metrics"]["accuracy"] >= 0
    assert results["data"]["rows"] == 8
    for name in ("lora", "merge", "onnx", "score"):  # every pass folder says how it was made
        assert json.loads((out / name / "manifest.json").read_text())["versions"]["slmops"]

    cfg["passes"]["score"]["config"]["metrics"] = ["accuracy", "f1"]  # only the evaluation changes
    config.write_text(json.dumps(cfg))
    assert main(["run", "--config", str(config)]) == 0
    assert ran(out) == {"lora": False, "merge": False, "onnx": False, "score": True}

    cfg["passes"]["lora"]["r"] = 2  # the first pass changes: it and everything after re-run
    config.write_text(json.dumps(cfg))
    assert main(["run", "--config", str(config)]) == 0
    assert ran(out) == {"lora": True, "merge": True, "onnx": True, "score": True}


def test_cache_is_keyed_by_model_content_not_path(tiny_llama, tokenizer_dir, sentiment_file, tmp_path):
    import shutil

    from slmops.workflow.reading import validate
    from slmops.workflow.engine import plan

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    cfg = chain(model, sentiment_file, tmp_path / "run")
    cfg["passes"] = {"lora": cfg["passes"]["lora"]}
    import slmops

    assert slmops.run(cfg).adapter == str(tmp_path / "run" / "lora" / "adapter")  # the Python API
    assert plan(validate(cfg))[0]["done"]

    from conftest import build_model  # another model under the same path (Olive #1936)
    other = build_model(tokenizer_dir, tmp_path / "other", "qwen2")
    shutil.rmtree(model)
    shutil.copytree(other, model)
    assert not plan(validate(cfg))[0]["done"]


def test_pass_interrupted_or_half_published_is_never_taken_as_done(tiny_gpt2, io_file, tmp_path):
    from slmops.workflow.reading import validate
    from slmops.workflow.engine import plan, run_workflow

    cfg = yaml.safe_load(SEED.replace("MODEL", str(tiny_gpt2)).replace("DATA", str(io_file)))
    cfg["passes"]["lora"]["config"]["max_steps"] = 2
    cfg["output_dir"] = str(tmp_path / "run")
    wf = validate(cfg)
    folder = tmp_path / "run" / "lora"
    folder.mkdir(parents=True)
    key = plan(wf)[0]["key"]
    (folder / "pass.json").write_text(json.dumps({"key": key, "status": "running"}))  # published, record unwritten
    assert not plan(wf)[0]["done"]
    run_workflow(wf)
    assert plan(wf)[0]["done"] and (folder / "adapter" / "adapter_config.json").exists()


def test_finetune_command_saves_the_workflow_it_runs(tiny_llama, sentiment_file, tmp_path, capsys):
    out, saved = tmp_path / "ft", tmp_path / "ft.yaml"
    assert main(["finetune", "-m", str(tiny_llama), "-d", str(sentiment_file), "--text_template", TEMPLATE,
                 "--eval_split", "train[:8]", "--train_split", "train[8:]", "--lora_r", "4", "--max_steps", "2",
                 "-o", str(out), "--save_config_file", str(saved)]) == 0
    cfg = yaml.safe_load(saved.read_text())
    assert cfg["passes"]["finetune"]["type"] == "LoRA" and cfg["passes"]["finetune"]["config"]["lora_r"] == 4
    assert [d["load_dataset_config"]["split"] for d in cfg["data_configs"]] == ["train[8:]", "train[:8]"]
    capsys.readouterr()
    assert main(["run", "--config", str(saved), "--dry_run"]) == 0  # the same run: already done
    assert "reuse (unchanged)" in capsys.readouterr().out
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert main(["run", "--config", str(saved)]) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["eval"]["rows"] == 8


def test_validation_reports_every_problem_with_its_yaml_path(tmp_path, capsys):
    cfg = {"model": {"type": "HfModel", "config": {"model_path": "m", "colour": "red"}},
           "data_configs": [{"name": "d", "load_dataset_config": {"data_files": "x.jsonl"},
                             "pre_process_data_config": {"text_template": "{a} {b}", "max_seq_len": 0}}],
           "passes": {"lora": {"type": "LoRA", "config": {"r": -4, "lora_dropout": 1.5, "warp": 9,
                                                          "train_data_config": "nope"}},
                      "q": {"type": "Quantize"},
                      "onnx": {"type": "ModelBuilder", "config": {"precision": "int3"}}},
           "search_strategy": {"type": "random", "num_trials": 2},
           "search_space": {"colour": {"type": "choice", "values": ["red"]},
                            "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-5}}}
    err = fails(capsys, ["run", "--config", str(write_config(tmp_path / "bad.json", json.dumps(cfg)))],
                "model.config.colour: unknown key",
                "data_configs[0].pre_process_data_config.max_seq_len: must be a positive integer, got 0",
                "passes.lora.config.r: must be a positive integer, got -4",
                "passes.lora.config.lora_dropout: must lie in [0, 1), got 1.5",
                "passes.lora.config.warp: unknown option",
                "passes.q.type: unknown pass type 'Quantize'; known: LoRA, QLoRA",
                "passes.onnx.config.precision: got 'int3'",
                "search_space.colour: the fine-tuning pass has no option 'colour'",
                "search_space.learning_rate: low 0.001 is above high 1e-05")
    assert "problems:" in err


@pytest.mark.parametrize("text,expected", [
    ("model: {type: HfModel\npasses: [", "YAML syntax error at line 2, column 7"),
    ("model: {type: HfModel, config: {model_path: m}}\npasses: {l: {type: LoRA}}\nsearch_strategy: {type: tpe}\n",
     "search_space: empty; name at least one option"),
    ("model: {type: HfModel, config: {model_path: m}}\npasses: {}\n", "passes: none given"),
])
def test_bad_files_are_one_message(tmp_path, capsys, text, expected):
    fails(capsys, ["run", "--config", str(write_config(tmp_path / "w.yaml", text))], expected)


def test_missing_config_and_json_syntax(tmp_path, capsys):
    fails(capsys, ["run", "--config", str(tmp_path / "none.yaml")], "config file not found")
    fails(capsys, ["run", "--config", str(write_config(tmp_path / "w.json", '{"model": }'))],
          "JSON syntax error at line 1, column 11")


def test_setup_lists_and_installs_what_the_passes_need(tmp_path, capsys, monkeypatch):
    import slmops.cli.run as run_cli

    cfg = {"model": {"config": {"model_path": "m"}}, "passes": {"q": {"type": "QLoRA"}, "x": {"type": "ModelBuilder"}},
           "data_configs": [{"name": "d", "pre_process_data_config": {"text_field": "t"}}],
           "search_strategy": {"type": "random"}, "search_space": {"lora_r": {"type": "int", "low": 2, "high": 4}}}
    config = write_config(tmp_path / "w.json", json.dumps(cfg))
    monkeypatch.setattr(run_cli, "_installed", lambda module: module not in ("optuna", "bitsandbytes"))
    assert main(["run", "--config", str(config), "--list_required_packages"]) == 0
    listed = capsys.readouterr().out
    assert "bitsandbytes>=0.45" in listed and "onnxruntime-genai" in listed and "optuna" in listed
    assert [line.split()[-1] for line in listed.splitlines() if "optuna" in line] == ["missing"]
    fails(capsys, ["run", "--config", str(config)], "not installed; add --setup to install them")
    calls = []
    monkeypatch.setattr(run_cli.subprocess, "run", lambda argv, check: calls.append(argv))
    assert main(["run", "--config", str(config), "--setup", "--dry_run"]) == 0
    assert calls and calls[0][-2:] == ["bitsandbytes>=0.45", "optuna>=4.9"]


def search_config(model: Path, data: Path, out: Path, trials: int = 4, steps: int = 4) -> dict:
    cfg = chain(model, data, out)
    cfg["passes"] = {"lora": {"type": "LoRA", "config": {"max_steps": steps, "per_device_train_batch_size": 4}}}
    cfg["search_strategy"] = {"type": "random", "num_trials": trials, "seed": 3}
    cfg["search_space"] = {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                           "lora_r": {"type": "int", "low": 2, "high": 8, "step": 2}}
    return cfg


def test_random_search_ends_with_a_table_and_the_best_adapter(tiny_llama, sentiment_file, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path / "s.json", json.dumps(search_config(tiny_llama, sentiment_file, out)))
    assert main(["search", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "eval_loss" in printed and "learning_rate" in printed and "best: trial" in printed
    results = json.loads((out / "lora" / "search_results.json").read_text())
    assert len(results["trials"]) == 4 and results["metric"] == "eval_loss"
    complete = [t for t in results["trials"] if t["state"] == "complete"]
    assert results["best_value"] == min(t["eval_loss"] for t in complete)
    best = Path(results["best_folder"])
    manifest = json.loads((best / "manifest.json").read_text())
    assert manifest["results"]["eval_loss"] == pytest.approx(results["best_value"])
    assert manifest["options"]["lora_r"] == results["best_params"]["lora_r"]
    assert manifest["resolved"]["training_args"]["learning_rate"] == pytest.approx(results["best_params"]["learning_rate"])
    assert json.loads((out / "lora" / "pass.json").read_text())["output_model"]["adapter"] == str(best / "adapter")
    assert (out / "lora" / "search_results.csv").read_text().count("\n") == 5
    assert {t["lora_r"] for t in results["trials"]} <= {2, 4, 6, 8}
    # the study as its SQLite file holds it, without running anything
    assert main(["search", "--config", str(config), "--status"]) == 0
    shown = capsys.readouterr().out
    assert "4 planned" in shown and f"best so far: trial {results['best_trial']}" in shown
    assert results["best_folder"] in shown


def test_interrupted_search_resumes_its_study(tiny_llama, sentiment_file, tmp_path, monkeypatch):
    import slmops.workflow.search as search

    out = tmp_path / "run"
    config = write_config(tmp_path / "s.json", json.dumps(search_config(tiny_llama, sentiment_file, out, steps=2)))
    real, calls = search.finetune, []

    def stop_on_third(step):
        calls.append(step.out)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(step)

    monkeypatch.setattr(search, "finetune", stop_on_third)
    assert main(["search", "--config", str(config)]) == 130
    first = {p.name: (p / "manifest.json").stat().st_mtime_ns for p in (out / "lora" / "trials").glob("trial-*")
             if (p / "manifest.json").exists()}
    assert sorted(first) == ["trial-000", "trial-001"]
    monkeypatch.setattr(search, "finetune", real)
    assert main(["search", "--config", str(config)]) == 0
    results = json.loads((out / "lora" / "search_results.json").read_text())
    finished = [t for t in results["trials"] if t["state"] in ("complete", "pruned")]
    assert len(finished) == 4 and {t["trial"] for t in finished} >= {0, 1}
    assert all((out / "lora" / "trials" / n / "manifest.json").stat().st_mtime_ns == t for n, t in first.items())


def test_two_workers_share_one_sqlite_study(tiny_llama, sentiment_file, tmp_path):
    import os
    import subprocess
    import sys

    import optuna

    out = tmp_path / "run"
    config = write_config(tmp_path / "s.json", json.dumps(search_config(tiny_llama, sentiment_file, out, steps=8)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "-m", "slmops", "search", "--config", str(config)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'lora' / 'study.db'}")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 4 and len({t.number for t in finished}) == 4
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both workers took trials


def test_onnx_passes_quantize_extract_adapters_and_evaluate(tiny_llama, sentiment_file, tmp_path):
    import onnx

    out = tmp_path / "run"
    cfg = chain(tiny_llama, sentiment_file, out)
    cfg["passes"] = {"onnx": {"type": "OnnxConversion", "config": {"parity_prompts": 2}},
                     "int4": {"type": "OnnxQuantization", "config": {"precision": "int4", "parity_prompts": 2}},
                     "score": {"type": "Evaluate", "config": {"metrics": ["accuracy"], "max_samples": 4}}}
    assert main(["run", "--config", str(write_config(tmp_path / "q.json", json.dumps(cfg)))]) == 0
    graph = onnx.load(out / "int4" / "model.onnx", load_external_data=False).graph
    assert any(n.op_type == "MatMulNBits" for n in graph.node)
    assert json.loads((out / "int4" / "manifest.json").read_text())["options"]["precision"] == "int4"
    assert json.loads((out / "score" / "results.json").read_text())["model"] == str(out / "int4")

    cfg["output_dir"] = str(tmp_path / "run2")
    cfg["passes"] = {"lora": {"type": "LoRA", "config": {"r": 4, "max_steps": 2, "task_name": "tone"}},
                     "multi": {"type": "ExtractAdapters", "config": {"parity_prompts": 1}},
                     "score": {"type": "Evaluate", "config": {"metrics": ["accuracy"], "max_samples": 4}}}
    assert main(["run", "--config", str(write_config(tmp_path / "x.json", json.dumps(cfg)))]) == 0
    assert (tmp_path / "run2" / "multi" / "adapters" / "tone.onnx_adapter").is_file()
    results = json.loads((tmp_path / "run2" / "score" / "results.json").read_text())
    assert results["adapter"] == "tone" and results["backend"].lower().startswith("onnx")


def test_grid_search_tries_each_choice_once(tiny_llama, sentiment_file, tmp_path, capsys):
    cfg = search_config(tiny_llama, sentiment_file, tmp_path / "run", trials=4, steps=2)
    cfg["search_strategy"] = {"type": "grid", "num_trials": 4}
    cfg["search_space"] = {"lora_r": {"type": "choice", "values": [2, 4]},
                           "target_modules": {"type": "choice", "values": [["q_proj"], ["q_proj", "v_proj"]]}}
    assert main(["run", "--config", str(write_config(tmp_path / "g.json", json.dumps(cfg)))]) == 0
    trials = json.loads((tmp_path / "run" / "lora" / "search_results.json").read_text())["trials"]
    assert sorted((t["lora_r"], t["target_modules"]) for t in trials) == [
        (2, "q_proj"), (2, "q_proj,v_proj"), (4, "q_proj"), (4, "q_proj,v_proj")]
    for t in trials:
        options = json.loads((Path(t["folder"]) / "manifest.json").read_text())["options"]
        assert options["target_modules"] == t["target_modules"].split(",")
