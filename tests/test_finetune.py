from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from conftest import FAMILIES, TEMPLATE, build_model, sentiment_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from slmops import finetune
from slmops.errors import Interrupted, UsageError

FAST = dict(per_device_train_batch_size=8, logging_steps=1, learning_rate=5e-3, save_steps=1000, lora_dropout=0.0,
            report_to="none")


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def run(model, data, out, **kw):
    return finetune(model_name_or_path=str(model), data_name=str(data), text_template=TEMPLATE,
                    output_path=str(out), **{**FAST, **kw})


@pytest.fixture
def repeated_batch(tmp_path):
    """Eight rows, one batch: every step sees the same batch, so the loss must fall."""
    return write_jsonl(tmp_path / "eight.jsonl", sentiment_rows(8))


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr", "ia3", "full", "qlora"])
def test_each_method_learns_a_repeated_batch(method, tiny_llama, repeated_batch, tmp_path):
    lr = {"full": 1e-3, "ia3": 0.3, "lokr": 3e-2}.get(method, 5e-3)
    out = run(tiny_llama, repeated_batch, tmp_path / "out", method=method, max_steps=12, learning_rate=lr,
              eval_split="train[:2]")
    curve = losses(out)
    assert len(curve) == 12
    assert curve[-1] < curve[0] * 0.9, curve
    written = "model" if method == "full" else "adapter"
    assert (out / written).is_dir() and not (out.parent / "out.partial").exists()
    suffix = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert (out / written / suffix).exists()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_families_train_with_default_targets(family, tokenizer_dir, models_root, repeated_batch, tmp_path):
    model = build_model(tokenizer_dir, models_root, family)
    out = run(model, repeated_batch, tmp_path / "out", max_steps=8, eval_split="train[:2]")
    curve = losses(out)
    assert curve[-1] < curve[0], curve
    targets = json.loads((out / "manifest.json").read_text())["resolved"]["target_modules"]
    assert "lm_head" not in targets and len(targets) >= 3


def test_qlora_weights_stay_trainable_after_eval(tiny_llama):
    from slmops.models.loading import load_model
    from slmops.training.model_setup import keep_4bit_trainable, quantization_config
    model = load_model(str(tiny_llama), torch.float32, quantization_config=quantization_config(torch.float32),
                       device_map={"": "cpu"})
    assert keep_4bit_trainable(model) == 14  # 7 linear layers x 2 blocks
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu"))


def test_output_folder_manifest_and_merge(tiny_llama, sentiment_file, tmp_path):
    out = run(tiny_llama, sentiment_file, tmp_path / "out", max_steps=4, merge=True, task_name="tone",
              eval_strategy="no")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["task_name"] == "tone" and manifest["seed"] == 42
    assert manifest["data"]["train"]["rows"] + manifest["data"]["eval"]["rows"] == 48
    assert len(manifest["data"]["fingerprint"]) == 64
    assert manifest["results"]["eval_loss"] > 0 and manifest["results"]["tokens_per_second"] > 0
    assert manifest["versions"]["peft"] and manifest["results"]["peak_rss_mb"] > 0
    # the responses are labels: accuracy is measured by default, before and after
    assert manifest["resolved"]["eval_metrics"] == ["accuracy", "f1"]
    results = manifest["results"]
    assert 0 <= results["eval_before"]["eval_accuracy"] <= 1 and 0 <= results["eval_accuracy"] <= 1
    assert 0 <= results["eval_before"]["eval_f1"] <= 1 and 0 <= results["eval_f1"] <= 1
    # tokens/s leaves out the evaluation inside training (step 0), not the final one after it
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "eval_runtime" in e] == [0, 4]
    inside = [e["eval_runtime"] for e in events if "eval_runtime" in e and e["step"] == 0]
    assert results["eval_seconds_in_training"] == pytest.approx(sum(inside), abs=0.01)
    assert results["tokens_per_second"] == pytest.approx(
        results["train_tokens"] / (results["train_runtime_s"] - sum(inside)), rel=1e-2)
    # where the wall time went, phase by phase; the phases do not overlap, so they sum to at most the whole
    timing, wall = manifest["results"]["timing"], manifest["results"]["wall_time_s"]
    assert set(timing) == {"load", "data", "preflight", "forgetting_check", "training", "evaluation", "saving"}
    assert min(timing.values()) >= 0 and timing["evaluation"] > 0 and sum(timing.values()) <= wall + 0.05
    # the Python API runs through the engine, as the command and a workflow file do: the pass is recorded
    record = json.loads((out / "pass.json").read_text())
    assert record["type"] == "LoRA" and record["output_model"]["adapter"] == str(out / "adapter")
    # merged model answers exactly like base + adapter
    from peft import PeftModel
    tok = AutoTokenizer.from_pretrained(out / "adapter")
    ids = tok("Review: good film\nTone:", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, out / "adapter").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(ids).logits
    assert torch.allclose(adapted, merged, atol=1e-4)
    assert not torch.allclose(plain, merged, atol=1e-4)


def test_same_seed_same_curve_other_seed_differs(tiny_llama, sentiment_file, tmp_path):
    kw = dict(max_steps=5, lora_dropout=0.1)
    a = losses(run(tiny_llama, sentiment_file, tmp_path / "a", **kw))
    b = losses(run(tiny_llama, sentiment_file, tmp_path / "b", **kw))
    c = losses(run(tiny_llama, sentiment_file, tmp_path / "c", seed=7, **kw))
    assert a == b
    assert a != c


class SignalAt(TrainerCallback):
    """Send this process a real SIGTERM after `step` optimizer steps."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_signal_checkpoints_and_resume_matches_uninterrupted(tiny_llama, sentiment_file, tmp_path):
    kw = dict(max_steps=8, lora_dropout=0.1, logging_steps=1)
    whole_run = run(tiny_llama, sentiment_file, tmp_path / "whole", **kw)
    whole = losses(whole_run)

    out = tmp_path / "cut"
    with pytest.raises(Interrupted, match="resume_from_checkpoint auto"):
        run(tiny_llama, sentiment_file, out, callbacks=[SignalAt(3)], **kw)
    assert not out.exists()
    # the signal lands after step 3 has ended, so step 4 completes and is saved
    assert (tmp_path / "cut.partial" / "checkpoints" / "checkpoint-4").is_dir()
    with pytest.raises(UsageError, match="interrupted run left checkpoints"):
        run(tiny_llama, sentiment_file, out, **kw)

    run(tiny_llama, sentiment_file, out, resume_from_checkpoint="auto", **kw)
    resumed = losses(out)
    assert resumed[-1] == pytest.approx(whole[-1], rel=1e-5)
    assert resumed[:3] == pytest.approx(whole[:3], rel=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["results"]["global_step"] == 8
    # the whole run's mean training loss, not only the steps after the resume
    whole_loss = json.loads((whole_run / "manifest.json").read_text())["results"]["train_loss"]
    assert manifest["results"]["train_loss"] == pytest.approx(whole_loss, rel=1e-5)
    # tokens/s counts only this session's tokens over this session's time
    results = manifest["results"]
    assert results["tokens_per_second"] * results["train_runtime_s"] < results["train_tokens"] * 0.75


def test_existing_output_is_refused_then_overwritten(tiny_llama, sentiment_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UsageError, match="already exists"):
        run(tiny_llama, sentiment_file, out, max_steps=1)
    assert (out / "keep.txt").read_text() == "precious"
    run(tiny_llama, sentiment_file, out, max_steps=1, overwrite=True)
    assert (out / "adapter").is_dir() and not (out / "keep.txt").exists()


def test_training_args_pass_through_and_unknown_rejected(tiny_llama, sentiment_file, tmp_path):
    out = run(tiny_llama, sentiment_file, tmp_path / "out", max_steps=2, warmup_steps=1, lr_scheduler_type="cosine",
              weight_decay=0.01)
    ta = json.loads((out / "manifest.json").read_text())["resolved"]["training_args"]
    assert ta["lr_scheduler_type"] == "cosine" and ta["weight_decay"] == 0.01
    with pytest.raises(UsageError, match="--not_a_flag"):
        run(tiny_llama, sentiment_file, tmp_path / "x", not_a_flag=1)


def test_torch_compile_on_cpu_warns_that_packed_batches_recompile(tmp_path, caplog):
    from slmops.options.finetune_options import FinetuneOptions
    from slmops.training.args import build_training_args

    def warned(**training_args) -> bool:
        cfg = FinetuneOptions.build(model_name_or_path="m", data_name="d", text_template=TEMPLATE,
                                   output_path=str(tmp_path / "o"), training_args={"use_cpu": True, **training_args})
        caplog.clear()
        with caplog.at_level("WARNING"):
            build_training_args(cfg, tmp_path / "c", torch.float32)
        return "--torch_compile on CPU" in caplog.text

    assert warned(torch_compile=True)
    assert not warned() and not warned(torch_compile=False)


def test_early_stopping_and_eval_steps(tiny_llama, sentiment_file, tmp_path):
    out = run(tiny_llama, sentiment_file, tmp_path / "out", max_steps=40, learning_rate=0.5, eval_steps=2,
              early_stopping_patience=1)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r and "train_runtime" not in r]
    assert evals and max(r["step"] for r in records) < 40


def test_tensorboard_and_metrics_carry_loss_and_resources(tiny_llama, sentiment_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "tb"
    out = run(tiny_llama, sentiment_file, tmp_path / "out", max_steps=2, report_to="tensorboard",
              logging_dir=str(logs), eval_steps=2)
    events = next(p for p in logs.rglob("*") if p.name.startswith("events.out.tfevents"))
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"train/loss", "train/rss_mb", "train/cpu_percent", "eval/loss", "eval/rss_mb"} <= set(tags)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in records)
    for record in records:  # training and evaluation events alike
        pre = "eval_" if "eval_loss" in record else ""
        assert record[pre + "rss_mb"] > 50 and 0 <= record[pre + "cpu_percent"] <= 100


def test_tensorboard_default_folder_is_inside_output(tiny_llama, sentiment_file, tmp_path):
    out = run(tiny_llama, sentiment_file, tmp_path / "out", max_steps=2, report_to="tensorboard")
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "logs").rglob("*"))


def test_chat_data_trains_on_assistant_turns(tiny_llama, tmp_path):
    rows = [{"messages": [{"role": "user", "content": r["phrase"]}, {"role": "assistant", "content": r["tone"]}]}
            for r in sentiment_rows(16)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = finetune(model_name_or_path=str(tiny_llama), data_name=str(data), use_chat_template=True,
                   output_path=str(tmp_path / "out"), **{**FAST, "max_steps": 2})
    stats = json.loads((out / "manifest.json").read_text())["data"]["train"]
    assert 0 < stats["supervised_tokens"] < stats["tokens"] / 2


def test_text_field_and_gradient_checkpointing(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": f"{r['phrase']} is {r['tone']}"} for r in sentiment_rows(16)])
    out = finetune(model_name_or_path=str(tiny_llama), data_name=str(data), text_field="text",
                   output_path=str(tmp_path / "out"), gradient_checkpointing=True, **{**FAST, "max_steps": 6})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolved"]["training_args"]["gradient_checkpointing"] is True
    stats = manifest["data"]["train"]
    assert stats["supervised_tokens"] == stats["tokens"]  # no prompt: the whole text is learned
    curve = losses(out)
    assert curve[-1] < curve[0]


def test_max_samples_and_truncation_reported(tiny_llama, tmp_path):
    rows = [dict(r, phrase=r["phrase"] * (8 if i % 2 else 1)) for i, r in enumerate(sentiment_rows(40))]
    data_file = write_jsonl(tmp_path / "mixed.jsonl", rows)
    out = run(tiny_llama, data_file, tmp_path / "out", max_steps=1, max_samples=30, max_seq_len=24)
    data = json.loads((out / "manifest.json").read_text())["data"]
    assert data["train"]["rows"] + data["train"]["dropped"] + data["eval"]["rows"] + data["eval"]["dropped"] == 30
    assert data["train"]["truncated"] >= data["train"]["dropped"] > 0 and data["train"]["rows"] > 0


def test_held_out_validation_is_capped(tiny_llama, sentiment_file, tmp_path):
    out = run(tiny_llama, sentiment_file, tmp_path / "out", max_steps=1, eval_fraction=0.5, max_eval_samples=5)
    data = json.loads((out / "manifest.json").read_text())["data"]
    # per-class rounding of the stratified split may take one fewer than the cap
    assert 4 <= data["eval"]["rows"] <= 5 and data["train"]["rows"] + data["eval"]["rows"] == 48


def test_packing_changes_speed_not_learning(tiny_llama, tmp_path):
    rows = sentiment_rows(24)
    for i, row in enumerate(rows):  # rows of different lengths, so padding would matter
        row["phrase"] = " ".join([row["phrase"]] * (1 + i % 4))
    data = write_jsonl(tmp_path / "varied.jsonl", rows)
    # fp32 on every machine: in bf16, packed short rows attend in fp32 and padded ones in bf16
    same = dict(max_steps=6, eval_split="train[:8]", torch_dtype="float32")
    packed = run(tiny_llama, data, tmp_path / "packed", **same)  # shared: no dropout
    unshared = run(tiny_llama, data, tmp_path / "unshared", share_prefix=False, **same)
    padded = run(tiny_llama, data, tmp_path / "padded", packing=False, **same)
    assert losses(packed) == pytest.approx(losses(padded), rel=1e-4)
    assert losses(unshared) == pytest.approx(losses(padded), rel=1e-4)
    manifests = [json.loads((out / "manifest.json").read_text()) for out in (packed, unshared, padded)]
    assert [m["resolved"]["packing"] for m in manifests] == [True, True, False]
    assert [m["resolved"]["share_prefix"] for m in manifests] == [True, False, False]  # "Review:" opens every row
    assert manifests[0]["results"]["eval_loss"] == pytest.approx(manifests[2]["results"]["eval_loss"], rel=1e-4)
    # tokens seen count the tokens the model ran on: padding never, a shared prefix once per batch, and not a
    # packed row's closing token (its own target, which no position after it in the row predicts from)
    tokens = [m["results"]["train_tokens"] for m in manifests]
    assert tokens[2] - tokens[1] == 6 * FAST["per_device_train_batch_size"] and tokens[1] > tokens[0] > 0


def test_prefix_is_shared_by_default_only_under_no_dropout(tiny_llama, sentiment_file, tmp_path):
    cases = {"exact": dict(lora_dropout=0.0), "dropout": dict(lora_dropout=0.05),
             "asked": dict(lora_dropout=0.05, share_prefix=True)}
    outs = {name: run(tiny_llama, sentiment_file, tmp_path / name, max_steps=1, **kw) for name, kw in cases.items()}
    shared = {name: json.loads((out / "manifest.json").read_text())["resolved"]["share_prefix"]
              for name, out in outs.items()}
    assert shared == {"exact": True, "dropout": False, "asked": True}


def test_preflight_estimates_and_warns_when_memory_is_short(tiny_llama, sentiment_file, tmp_path, monkeypatch,
                                                            caplog):
    import psutil

    out = run(tiny_llama, sentiment_file, tmp_path / "out", max_steps=2, eval_split="train[:4]")
    estimate = json.loads((out / "manifest.json").read_text())["results"]["preflight"]
    assert estimate["calibration_rows"] == 8 and estimate["est_epoch_seconds"] > 0
    assert 0 < estimate["est_peak_memory_mb"] < estimate["memory_capacity_mb"]
    assert "not fit" not in caplog.text

    real = psutil.virtual_memory()  # nothing free beyond what the process holds: the step's growth cannot fit
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=0))
    with caplog.at_level("WARNING"):
        run(tiny_llama, sentiment_file, tmp_path / "out2", max_steps=1, eval_split="train[:4]")
    assert "will likely not fit in RAM" in caplog.text


def test_forgetting_check_measures_general_text_before_and_after(tiny_llama, sentiment_file, tmp_path, caplog,
                                                                 monkeypatch):
    from slmops.training import forgetting

    monkeypatch.setattr(forgetting, "FORGETTING_RATIO", 1.0)  # any rise warns: the tiny model's text gets harder
    with caplog.at_level("WARNING"):
        out = run(tiny_llama, sentiment_file, tmp_path / "out", max_steps=6, learning_rate=5e-2,
                  eval_split="train[:4]")
    check = json.loads((out / "manifest.json").read_text())["results"]["forgetting"]
    before, after = check["reference_perplexity_before"], check["reference_perplexity_after"]
    # before: the untouched random model, close to uniform over its 399 tokens
    assert 200 < before < 800 and after != before
    assert check["ratio"] == pytest.approx(after / before, rel=1e-3)
    assert ("may be forgetting" in caplog.text) == (after > before)
    assert len(forgetting.reference_text()) > 2000


def test_eval_accuracy_is_greedy_exact_match_before_and_after(tiny_llama, repeated_batch, tmp_path):
    from peft import PeftModel
    from sklearn.metrics import f1_score

    from slmops.data.formatting import IGNORE
    from slmops.data.prepare import prepare_data
    from slmops.options.finetune_options import DataOptions

    out = run(tiny_llama, repeated_batch, tmp_path / "out", max_steps=12, eval_split="train[:8]",
              eval_metrics=["accuracy", "f1"], eval_steps=6)
    results = json.loads((out / "manifest.json").read_text())["results"]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "eval_accuracy" in e] == [0, 6, 12]  # before, during, after
    # tokens/s counts training time only, not the evaluations inside the trainer's clock
    evals = sum(e["eval_runtime"] for e in events if "eval_runtime" in e)
    assert results["eval_seconds_in_training"] == pytest.approx(evals, abs=0.01) and evals > 0
    assert results["tokens_per_second"] == pytest.approx(
        results["train_tokens"] / (results["train_runtime_s"] - evals), rel=1e-2)

    # independent check: decode each validation row greedily, one token at a time, with the saved adapter
    tok = AutoTokenizer.from_pretrained(out / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out / "adapter").eval()
    rows = prepare_data(DataOptions(model_name_or_path=str(tiny_llama), data_name=str(repeated_batch),
                                   eval_split="train[:8]", text_template=TEMPLATE), tok).eval
    hits, gold, decoded = [], [], []
    for row in rows:
        start = next(i for i, lab in enumerate(row["labels"]) if lab != IGNORE)
        ids = row["input_ids"][:start]
        for _ in range(len(row["input_ids"]) - start):
            with torch.no_grad():
                ids = ids + [int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
        hits.append(ids == row["input_ids"])
        gold.append(row["input_ids"][start])
        decoded.append(ids[start])  # the labels (positive, negative) differ in their first token
    assert results["eval_accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert results["eval_f1"] == pytest.approx(f1_score(gold, decoded, labels=sorted(set(gold)), average="macro"))
    assert results["eval_before"]["eval_accuracy"] < results["eval_accuracy"]
    assert results["eval_before"]["eval_loss"] > results["eval_loss"]


def test_unknown_eval_metric_is_refused(tiny_llama, sentiment_file, tmp_path):
    with pytest.raises(UsageError, match="unknown metric.*bleu; known: accuracy, f1"):
        run(tiny_llama, sentiment_file, tmp_path / "out", eval_metrics=["bleu"])


def test_a_checkpoint_cut_off_while_saving_is_passed_over(tmp_path, caplog):
    from slmops.training.recipe import last_checkpoint

    # 10 after 2: by number, not by name; 12 never got its state, 14 was killed while writing it
    for step, state in ((2, "{}"), (10, "{}"), (12, None), (14, "")):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert "checkpoint-12 is incomplete" in caplog.text and "checkpoint-14 is incomplete" in caplog.text
    assert last_checkpoint(tmp_path / "none") is None


def test_default_run_evaluates_five_times_with_the_task_metric(tiny_llama, sentiment_file, tmp_path):
    out = run(tiny_llama, sentiment_file, tmp_path / "out", max_steps=8)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], "eval_accuracy" in e) for e in events if "eval_loss" in e] == [
        (0, True), (2, True), (4, True), (6, True), (8, True)]  # before, each quarter, the end (reused)
    args = json.loads((out / "manifest.json").read_text())["resolved"]["training_args"]
    assert args["eval_steps"] == 0.25 and args["per_device_eval_batch_size"] == 32
