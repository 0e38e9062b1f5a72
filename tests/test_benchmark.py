"""`slmops benchmark` through EleutherAI's lm-evaluation-harness on tiny random models: our model class gives
the harness's own Hugging Face class's answers, the ONNX export scores like PyTorch, several models land in
one table (and in a fine-tune run's report page), and a task that cannot be had is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TEMPLATE, make_adapter, sentiment_rows, write_jsonl
from slmops import finetune
from slmops.cli import main

TASKS = {
    "tone_choice": """output_type: multiple_choice
doc_to_text: "Review: {{phrase}}\\nTone:"
doc_to_choice: ["negative", "positive"]
doc_to_target: "{{['negative', 'positive'].index(tone)}}"
metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]""",
    "tone_perplexity": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "Review: {{phrase}}\\nTone: {{tone}}"
metric_list: [{metric: word_perplexity}, {metric: bits_per_byte}]""",
    "tone_generate": """output_type: generate_until
doc_to_text: "Review: {{phrase}}\\nTone:"
doc_to_target: " {{tone}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 6, do_sample: false}
metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]""",
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """Three lm-eval task YAMLs over local sentiment rows: one of each kind of request the harness makes."""
    folder = tmp_path_factory.mktemp("tasks")
    data = write_jsonl(folder / "reviews.jsonl", sentiment_rows(24))
    for name, body in TASKS.items():
        (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs: {{data_files: "
                                             f"{{test: {data}}}}}\ntest_split: test\n{body}\n")
    return folder


def harness(model, tasks: Path, **kw) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, tasks=list(TASKS), task_manager=TaskManager(include_path=str(tasks)),
                                   log_samples=True, limit=12, **kw)


def test_our_model_class_answers_as_the_harness_hf_class(tiny_llama, tasks):
    from slmops.evaluation.harness import SlmopsLM

    theirs = harness("hf", tasks, model_args={"pretrained": str(tiny_llama)}, device="cpu", batch_size=4)
    ours = harness(SlmopsLM(pretrained=str(tiny_llama), batch_size=3), tasks)
    for task in TASKS:
        for a, b in zip(theirs["samples"][task], ours["samples"][task], strict=True):
            for want, got in zip(a["resps"], b["resps"], strict=True):
                if task == "tone_generate":
                    assert got == want  # greedy text, cut at the stop string
                elif task == "tone_choice":  # (log-likelihood, is_greedy)
                    assert got[0][0] == pytest.approx(want[0][0], abs=1e-4) and got[0][1] == want[0][1]
                else:
                    assert got[0] == pytest.approx(want[0], abs=1e-3)
    assert ours["results"]["tone_choice"]["acc,none"] == theirs["results"]["tone_choice"]["acc,none"]
    assert ours["results"]["tone_perplexity"]["bits_per_byte,none"] == pytest.approx(
        theirs["results"]["tone_perplexity"]["bits_per_byte,none"], rel=1e-5)


def test_onnx_export_scores_like_pytorch(tiny_llama, tasks, tmp_path):
    from slmops.evaluation.harness import SlmopsLM

    adapter = make_adapter(tiny_llama, tmp_path / "every", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"], 8, 2)
    out = tmp_path / "multi"
    assert main(["generate-adapter", "--base_model_path", str(tiny_llama), "--adapter_paths", str(adapter),
                 "--adapter_names", "big", "-o", str(out), "--parity_prompts", "1"]) == 0
    torch_lm = harness(SlmopsLM(pretrained=str(tiny_llama), adapter=str(adapter)), tasks)
    onnx_lm = harness(SlmopsLM(pretrained=str(out), adapter="big"), tasks)
    base = harness(SlmopsLM(pretrained=str(tiny_llama)), tasks)
    for task in ("tone_choice", "tone_perplexity"):
        want, got = ([r[0] if task == "tone_perplexity" else r[0][0] for s in run["samples"][task] for r in s["resps"]]
                     for run in (torch_lm, onnx_lm))
        assert got == pytest.approx(want, rel=1e-3, abs=1e-3)  # the export's fp32 tolerance
        untuned = [r[0] if task == "tone_perplexity" else r[0][0] for s in base["samples"][task] for r in s["resps"]]
        assert untuned != pytest.approx(want, rel=1e-3, abs=1e-3)  # the adapter is what both scored


def test_several_models_in_one_table_and_in_the_runs_report(tiny_llama, tasks, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(32))
    run = finetune(model_name_or_path=str(tiny_llama), data_name=str(data), text_template=TEMPLATE,
                   output_path=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=8,
                   learning_rate=5e-3, report_to="none")
    out = tmp_path / "bench"
    assert main(["benchmark", "--tasks", str(tasks / "tone_choice.yaml"), "--limit", "10", "-o", str(out),
                 "--compare", f"{tiny_llama},{run}"]) == 0
    printed = capsys.readouterr().out
    assert "tone_choice acc" in printed and f"[2] {tiny_llama} + adapter {run / 'adapter'} (torch" in printed
    summary = json.loads((out / "benchmark.json").read_text())
    assert summary["tasks"] == ["tone_choice"] and len(summary["scores"]) == 2
    value, stderr = summary["scores"][1]["tone_choice"]["acc"]
    raw = json.loads((out / "lm_eval" / "2.json").read_text())  # lm-eval's own results, whole
    assert raw["results"]["tone_choice"]["acc,none"] == value and stderr > 0
    assert json.loads((out / "manifest.json").read_text())["command"] == "benchmark"
    page = (run / "report.html").read_text()
    assert "Benchmarks (lm-evaluation-harness)" in page and f"{value:.4f} ± {stderr:.4f}" in page


@pytest.mark.parametrize("flags, message", [
    (["--tasks", "no_such_task_anywhere"], "unknown task(s) no_such_task_anywhere"),
    (["--tasks", "missing/tone.yaml"], "--tasks: missing/tone.yaml does not exist"),
    (["--tasks", "HUB", "--limit", "2"], "task 'from_the_hub' could not load its data"),
    (["--tasks", "tone_choice", "--backend", "ortgenai"], "is not an exported folder"),
    (["--tasks", "tone_choice", "--backend", "ort"], "is not an exported folder"),
    (["--tasks", "tone_choice", "--compare", "a,b", "-m", "MODEL"], "--compare names every model itself"),
    (["--tasks", "tone_choice", "--compare", "MODEL,/no/such/model"], "model path not found: /no/such/model"),
])
def test_bad_input_is_one_line(flags, message, tiny_llama, tasks, tmp_path, capsys):
    hub = tmp_path / "hub.yaml"
    hub.write_text(f"task: from_the_hub\ndataset_path: slmops-tests/no-such-dataset\n{TASKS['tone_choice']}\n")
    flags = [{"HUB": str(hub), "tone_choice": str(tasks / "tone_choice.yaml")}.get(f, f).replace("MODEL", str(tiny_llama))
             for f in flags]
    model = [] if "--compare" in flags else ["-m", str(tiny_llama)]
    assert main(["benchmark", *model, *flags, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
