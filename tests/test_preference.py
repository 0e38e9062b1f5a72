"""Preference stages (`--stage dpo|orpo|kto`) through TRL's trainers on a tiny model: each learns to prefer
the right tone, DPO goes on from an SFT adapter against that adapter as its reference, each stage resumes exactly
after an interruption, and rows that cannot teach anything are counted or refused in one line."""

from __future__ import annotations

import json

import pytest

from conftest import TEMPLATE, sentiment_rows, write_jsonl
from slmops import finetune
from slmops.cli import main
from slmops.errors import Interrupted, UsageError
from test_finetune import SignalAt, losses

FAST = dict(per_device_train_batch_size=8, logging_steps=1, learning_rate=5e-3, save_steps=1000, lora_dropout=0.0,
            report_to="none", beta=0.5, eval_split="train[:16]")


def preference_rows(n: int, stage: str) -> list[dict]:
    """The sentiment rows as preferences: the right tone chosen (desirable), the other rejected."""
    rows = []
    for r in sentiment_rows(n):
        prompt, other = f"Review: {r['phrase']}\nTone:", "negative" if r["tone"] == "positive" else "positive"
        if stage == "kto":
            rows += [{"prompt": prompt, "completion": " " + r["tone"], "label": True},
                     {"prompt": prompt, "completion": " " + other, "label": False}]
        else:
            rows.append({"prompt": prompt, "chosen": " " + r["tone"], "rejected": " " + other})
    return rows


def run(model, stage, out, rows=48, **kw):
    data = write_jsonl(out.parent / f"{stage}.jsonl", preference_rows(rows, stage))
    return finetune(model_name_or_path=str(model), data_name=str(data), stage=stage, output_path=str(out),
                    **{**FAST, **kw})


def evals(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]


@pytest.mark.parametrize("stage", ["dpo", "orpo", "kto"])
def test_each_stage_learns_to_prefer_the_right_tone(stage, tiny_llama, tmp_path):
    out = run(tiny_llama, stage, tmp_path / "out", max_steps=16, eval_steps=8)
    curve = losses(out)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["stage"] == stage and (out / "adapter" / "adapter_config.json").is_file()
    trl_args = manifest["resolved"]["training_args"]
    assert trl_args["beta"] == 0.5 and trl_args["max_length"] == 1024
    results, first, last = manifest["results"], evals(out)[0], evals(out)[-1]
    assert first["step"] == 0 and results["eval_before"]["eval_loss"] == first["eval_loss"]
    page = (out / "report.html").read_text()
    assert f"with lora ({stage.upper()}, beta 0.5)" in page and 'id="validation-reward-margin' in page
    if stage == "kto":  # KTO has no pairs to rank: its margin is desirable minus undesirable rewards
        assert last["eval_rewards/margins"] > max(first["eval_rewards/margins"], 0)
    else:
        assert last["eval_rewards/accuracies"] >= 0.75 > first["eval_rewards/accuracies"]
        assert results["eval_rewards/accuracies"] == last["eval_rewards/accuracies"]


def test_dpo_goes_on_from_an_sft_adapter_and_resumes_exactly(tiny_llama, sentiment_file, tmp_path):
    sft = finetune(model_name_or_path=str(tiny_llama), data_name=str(sentiment_file), text_template=TEMPLATE,
                   output_path=str(tmp_path / "sft"), max_steps=6, per_device_train_batch_size=8,
                   learning_rate=5e-3, lora_dropout=0.0, report_to="none")
    kw = dict(adapter_path=str(sft), max_steps=8)
    whole = run(tiny_llama, "dpo", tmp_path / "whole", **kw)
    # the policy starts as the SFT adapter (not the base) and the reference is that adapter too: rewards all zero
    fresh = evals(run(tiny_llama, "dpo", tmp_path / "fresh", max_steps=1))[0]
    start = evals(whole)[0]
    assert start["eval_logps/chosen"] > fresh["eval_logps/chosen"] + 0.5  # SFT made the right tone likelier
    assert start["eval_rewards/margins"] == 0 and start["eval_loss"] == pytest.approx(0.6931, 1e-3)

    cut = tmp_path / "cut"
    with pytest.raises(Interrupted, match="resume_from_checkpoint auto"):
        run(tiny_llama, "dpo", cut, callbacks=[SignalAt(3)], **kw)
    run(tiny_llama, "dpo", cut, resume_from_checkpoint="auto", **kw)
    assert losses(cut)[-1] == pytest.approx(losses(whole)[-1], rel=1e-5)


@pytest.mark.parametrize("stage", ["orpo", "kto"])
def test_orpo_and_kto_resume_exactly(stage, tiny_llama, tmp_path):
    whole = run(tiny_llama, stage, tmp_path / "whole", max_steps=6)
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted, match="resume_from_checkpoint auto"):
        run(tiny_llama, stage, cut, callbacks=[SignalAt(3)], max_steps=6)
    run(tiny_llama, stage, cut, resume_from_checkpoint="auto", max_steps=6)
    assert len(losses(cut)) == len(losses(whole)) == 6
    assert losses(cut)[-1] == pytest.approx(losses(whole)[-1], rel=1e-5)


def test_rows_that_teach_nothing_are_counted_or_refused(tiny_llama, tmp_path, capsys):
    good = preference_rows(20, "dpo")
    bad = [{**good[0], "rejected": good[0]["chosen"]}, {**good[1], "chosen": ""}]
    data = write_jsonl(tmp_path / "mixed.jsonl", good + bad)
    flags = ["data", "check", "-m", str(tiny_llama), "-d", str(data), "--stage", "dpo", "--eval_split", "train[:4]"]
    assert main(flags) == 0
    report = capsys.readouterr().out
    assert "train: 20 pairs kept; dropped: 1 with the same chosen and rejected answer, 1 with an empty prompt" in report

    same = write_jsonl(tmp_path / "same.jsonl", [{**r, "rejected": r["chosen"]} for r in good])
    with pytest.raises(UsageError, match="no train rows left: of 18, 18 had the same chosen and rejected answer"):
        finetune(model_name_or_path=str(tiny_llama), data_name=str(same), stage="dpo", output_path=str(tmp_path / "o"))
    assert main(["finetune", "-m", str(tiny_llama), "-d", str(same), "--stage", "kto", "-o", str(tmp_path / "k")]) == 2
    assert "no column 'completion', 'label'" in capsys.readouterr().err
    assert main(["finetune", "-m", str(tiny_llama), "-d", str(same), "--stage", "dpo", "--text_template",
                 "{prompt}", "-o", str(tmp_path / "t")]) == 2
    assert "--stage dpo reads the prompt and answers from their columns" in capsys.readouterr().err


def test_kto_labels_and_chat_messages(tiny_llama, tmp_path, capsys):
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "completion": r["completion"],
             "label": ["yes", "no", "maybe"][i % 3]} for i, r in enumerate(preference_rows(12, "kto"))]
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    flags = ["data", "check", "-m", str(tiny_llama), "-d", str(data), "--stage", "kto", "--eval_split", "train[:3]"]
    assert main(flags) == 2
    assert "message lists need --use_chat_template" in capsys.readouterr().err
    assert main([*flags, "--use_chat_template"]) == 0
    report = capsys.readouterr().out
    assert "train: 16 answers kept; dropped: 8 with a label that is neither" in report
    assert "desirable answers: 8, undesirable: 8" in report
    assert "completion: [{'role': 'assistant', 'content': ' positive'}]" in report
    out = finetune(model_name_or_path=str(tiny_llama), data_name=str(data), stage="kto", use_chat_template=True,
                   output_path=str(tmp_path / "out"), **{**FAST, "eval_split": "train[:3]", "max_steps": 2})
    assert json.loads((out / "manifest.json").read_text())["data"]["train"] == {"rows": 16, "dropped": 8, "dropped_why": {"bad_label": 8}}


def test_workflow_sft_then_dpo_pass_then_exported(tiny_llama, sentiment_file, tmp_path):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(32, "dpo"))
    out = tmp_path / "run"
    cfg = {"model": {"type": "HfModel", "config": {"model_path": str(tiny_llama)}},
           "data_configs": [{"name": "reviews", "type": "HuggingfaceContainer",
                             "load_dataset_config": {"data_files": str(sentiment_file), "split": "train"},
                             "pre_process_data_config": {"text_template": TEMPLATE.replace("\\\\", "\\")}},
                            {"name": "prefs", "type": "HuggingfaceContainer",
                             "load_dataset_config": {"data_files": str(prefs), "split": "train"},
                             "pre_process_data_config": {"prompt_field": "prompt"}}],
           "passes": {"sft": {"type": "LoRA", "config": {"r": 4, "max_steps": 2}},
                      "dpo": {"type": "DPO", "config": {"train_data_config": "prefs", "beta": 0.3, "max_steps": 2}},
                      "onnx": {"type": "ExtractAdapters", "config": {"parity_prompts": 2}}},
           "output_dir": str(out)}
    config = tmp_path / "flow.json"
    config.write_text(json.dumps(cfg))
    assert main(["run", "--config", str(config)]) == 0
    dpo = json.loads((out / "dpo" / "manifest.json").read_text())
    assert dpo["options"]["stage"] == "dpo" and dpo["options"]["beta"] == 0.3
    assert dpo["options"]["adapter_path"] == str(out / "sft" / "adapter")  # went on from the SFT pass's adapter
    assert json.loads((out / "onnx" / "parity.json").read_text())
    assert list((out / "onnx" / "adapters").glob("*.onnx_adapter"))


def test_search_over_beta_by_reward_accuracy(tiny_llama, tmp_path):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(32, "dpo"))
    out = tmp_path / "run"
    cfg = {"model": {"type": "HfModel", "config": {"model_path": str(tiny_llama)}},
           "data_configs": [{"name": "prefs", "type": "HuggingfaceContainer",
                             "load_dataset_config": {"data_files": str(prefs), "split": "train"}}],
           "passes": {"dpo": {"type": "DPO", "config": {"max_steps": 3, "learning_rate": 5e-3}}},
           "search_strategy": {"type": "grid", "num_trials": 2, "metric": "rewards/accuracies"},
           "search_space": {"beta": {"type": "choice", "values": [0.05, 0.5]}}, "output_dir": str(out)}
    config = tmp_path / "s.json"
    config.write_text(json.dumps(cfg))
    assert main(["search", "--config", str(config)]) == 0
    results = json.loads((out / "dpo" / "search_results.json").read_text())
    assert results["metric"] == "eval_rewards/accuracies" and {t["beta"] for t in results["trials"]} == {0.05, 0.5}
    assert results["best_value"] == max(t["eval_rewards/accuracies"] for t in results["trials"])
