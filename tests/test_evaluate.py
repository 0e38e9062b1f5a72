"""`slmops evaluate`: metric math against hand-computed values and the reference libraries, the PyTorch
backend against the model's own logits and loss, and the command line end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TEMPLATE, build_model, sentiment_rows, write_jsonl
from slmops import finetune
from slmops.cli import main
from slmops.evaluation import metrics as M
from slmops.evaluation.backends import TorchBackend
from slmops import evaluate
from test_cli import fails_cleanly

LABELS = ["negative", "positive"]


# --- metric math --------------------------------------------------------------------------------------

def test_classification_metrics_by_hand():
    refs = ["cat", "cat", "cat", "dog", "dog", "fish"]
    preds = ["cat", "cat", "dog", "dog", "fish", "fish"]
    classes = M.per_class(preds, refs, ["cat", "dog", "fish"])
    assert classes["cat"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8), "support": 3}
    assert classes["dog"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert classes["fish"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert M.macro_f1(classes) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert M.accuracy(preds, refs) == pytest.approx(4 / 6)
    assert M.confusion_matrix(preds, refs, ["cat", "dog", "fish"]) == (
        ["cat", "dog", "fish"], [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    # a generated answer that names no label gets its own column, and counts against recall only
    answers = [M.to_label(a, LABELS) for a in ["Positive.", "the negative", "not positive", "maybe"]]
    assert answers == ["positive", "negative", M.OTHER, M.OTHER]
    assert M.confusion_matrix(answers, ["positive", "negative", "positive", "negative"], LABELS) == (
        [*LABELS, M.OTHER], [[1, 0, 1], [0, 1, 1]])


def test_exact_match_normalises():
    answers, references = ["The Positive.", "not positive", " a  b "], ["positive", "positive", "b"]
    assert M.exact_match(answers, references) == pytest.approx(2 / 3)


def test_bleu_and_rouge_match_the_reference_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer

    same, other = ["the plot was long and dull"], ["bright funny music"]
    assert M.bleu(same, same) == pytest.approx(100.0) == sacrebleu.corpus_bleu(same, [same]).score
    assert M.bleu(other, same) == 0.0 == sacrebleu.corpus_bleu(other, [same]).score
    assert M.rouge(same, same) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert M.rouge(other, same) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    pred, ref = ["the plot was long"], ["the plot was long and dull"]
    direct = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"]).score(ref[0], pred[0])
    assert M.rouge(pred, ref) == {k: pytest.approx(v.fmeasure) for k, v in direct.items()}


def test_perplexity_latency_throughput():
    assert M.perplexity(3 * math.log(4), 3) == pytest.approx(4.0)
    assert M.latency([i / 100 for i in range(1, 101)]) == {"latency_p50_ms": pytest.approx(505.0),
                                                            "latency_p95_ms": pytest.approx(950.5)}
    assert M.throughput(100, 2.0) == 50.0


# --- the PyTorch backend against the model itself ----------------------------------------------------

@pytest.fixture(scope="module")
def backend(tiny_llama):
    return TorchBackend.load(str(tiny_llama))


@pytest.fixture(scope="module")
def raw(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(tiny_llama)


def brute_force_logprob(model, tok, prompt: str, label: str) -> float:
    """One text at a time, no padding: the label's tokens are what follows the prompt without its trailing
    space (the space is part of the label's first token, as in training)."""
    ids = tok(prompt + label)["input_ids"]
    start = len(tok(prompt.rstrip(" "))["input_ids"])
    assert ids[:start] == tok(prompt.rstrip(" "))["input_ids"]
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(start, len(ids)))


def test_likelihood_classification_matches_brute_force(backend, raw, tiny_llama, tmp_path):
    rows = sentiment_rows(12)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    prompts = [f"Review: {r['phrase']}\nTone: " for r in rows]
    expected = [[brute_force_logprob(*raw, p, label) for label in LABELS] for p in prompts]
    got = backend.continuation_logprobs([p for p in prompts for _ in LABELS], LABELS * len(prompts))
    assert [s.logprob for s in got] == pytest.approx([s for row in expected for s in row], abs=1e-4)
    predicted = [LABELS[row.index(max(row))] for row in expected]
    result = evaluate(str(tiny_llama), data_name=str(data), text_template=TEMPLATE,
                      metrics="accuracy,f1", progress=False)
    assert result["task"] == "classification" and result["predict"] == "likelihood"
    assert result["metrics"]["accuracy"] == pytest.approx(M.accuracy(predicted, [r["tone"] for r in rows]))
    classes = M.per_class(predicted, [r["tone"] for r in rows], LABELS)
    assert result["metrics"]["f1"] == pytest.approx(M.macro_f1(classes))


def test_batched_equals_unbatched(backend, tiny_llama, tmp_path):
    texts = [f"Review: {r['phrase']}" + " good" * i for i, r in enumerate(sentiment_rows(6))]
    conts = ["\nTone: positive", " bad", "\nTone: negative<|im_end|>", " x", " film film", "!"]
    # the last two share one forward pass: the first's input is the start of the second's
    prompts, conts = texts + [texts[0], texts[0]], conts + [" positive", " positive film"]
    batched = backend.continuation_logprobs(prompts, conts)
    single = [backend.continuation_logprobs([t], [c])[0] for t, c in zip(prompts, conts)]
    assert [s.tokens for s in batched] == [s.tokens for s in single]
    assert [s.greedy for s in batched] == [s.greedy for s in single]
    assert [s.logprob for s in batched] == pytest.approx([s.logprob for s in single], abs=1e-4)
    nll, count = backend.text_nll(texts)
    parts = [backend.text_nll([t]) for t in texts]
    assert count == sum(n for _, n in parts) and nll == pytest.approx(sum(s for s, _ in parts), rel=1e-5)
    assert backend.generate(texts, 5) == [backend.generate([t], 5)[0] for t in texts]
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(10))
    results = [evaluate(str(tiny_llama), data_name=str(data), text_template=TEMPLATE,
                        metrics="accuracy,perplexity", batch_size=size, progress=False)["metrics"] for size in (1, 7)]
    assert results[0] == pytest.approx(results[1], rel=1e-5)


def test_perplexity_is_exp_of_the_models_loss(backend, raw, tiny_llama, tmp_path):
    model, tok = raw
    text = "Review: good film\nTone: positive"
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    nll, count = backend.text_nll([text])
    assert count == ids.shape[1] - 1
    assert M.perplexity(nll, count) == pytest.approx(math.exp(loss), rel=1e-5)
    # --text_field: whole texts, the token-weighted mean of each text's own loss
    rows = sentiment_rows(3)
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    result = evaluate(str(tiny_llama), data_name=str(data), text_field="phrase", progress=False)
    total, tokens = 0.0, 0
    for r in rows:
        ids = torch.tensor([tok(r["phrase"])["input_ids"]])
        with torch.no_grad():
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    assert result["task"] == "text" and result["metrics"] == {"perplexity": pytest.approx(math.exp(total / tokens))}


# --- the command line ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    data = write_jsonl(folder / "train.jsonl", sentiment_rows(16))
    return finetune(model_name_or_path=str(tiny_llama), data_name=str(data), text_template=TEMPLATE,
                    output_path=str(folder / "tone"), max_steps=2, per_device_train_batch_size=8,
                    report_to="none", eval_split="train[:4]", eval_on_start=False)


def test_cli_writes_results_and_compares(tiny_llama, adapter, tmp_path, capsys):
    data = write_jsonl(tmp_path / "dev.jsonl", sentiment_rows(10, seed=1))
    flags = ["-d", str(data), "--text_template", TEMPLATE, "--log_level", "2"]
    after = tmp_path / "after.json"
    assert main(["evaluate", "--adapter_path", str(adapter), *flags, "-o", str(after),
                 "--metrics", "accuracy,f1,exact_match,perplexity,latency,throughput"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "confusion (rows: true label" in out and f"wrote {after}" in out
    result = json.loads(after.read_text())
    assert result["adapter"] == str(adapter / "adapter") and result["model"] == str(tiny_llama)
    assert result["data"]["rows"] == 10 and len(result["data"]["fingerprint"]) == 64
    assert result["versions"]["sacrebleu"] and result["versions"]["torch"]
    assert set(result["metrics"]) == {"accuracy", "f1", "exact_match", "perplexity", "response_perplexity",
                                      "latency_p50_ms", "latency_p95_ms", "throughput_tokens_per_s"}
    assert set(result["per_class"]) == set(LABELS) and not list(tmp_path.glob(".after.json.*"))
    # --compare: a results file, the same adapter evaluated now (its base read from it), and the bare model
    assert main(["evaluate", "--compare", str(after), f"@{adapter}", str(tiny_llama), *flags,
                 "--metrics", "accuracy"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("accuracy")).split()
    assert len(line) == 4 and line[1] == line[2] == f"{result['metrics']['accuracy']:.4f}"
    assert f"[1] {tiny_llama} + adapter {adapter / 'adapter'}" in out and f"[3] {tiny_llama} (torch" in out
    assert f"[2] {tiny_llama} + adapter" in out and "warning" not in out


def test_generation_task_and_generated_labels(tiny_llama, tmp_path):
    rows = [{"q": f"say {w}", "a": f"{w} film"} for w in ["good", "bad", "long", "short", "sad", "funny"]]
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    result = evaluate(str(tiny_llama), data_name=str(data), text_template="Q: {q}\\nA: {a}", max_new_tokens=4,
                      progress=False)
    assert result["task"] == "generation" and result["predict"] == "generate"
    assert set(result["metrics"]) == {"exact_match", "bleu", "rouge1", "rouge2", "rougeL"}
    labels = write_jsonl(tmp_path / "labels.jsonl", sentiment_rows(6))
    result = evaluate(str(tiny_llama), data_name=str(labels), text_template=TEMPLATE, predict="generate",
                      metrics=["accuracy", "f1"], progress=False)
    assert result["predict"] == "generate" and sum(map(sum, result["confusion"]["counts"])) == 6


def test_bad_input_is_one_line_exit_2(tiny_llama, tokenizer_dir, models_root, adapter, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(6))
    base = ["evaluate", "-m", str(tiny_llama), "-d", str(data), "--text_template", TEMPLATE]

    def fails(extra, expect, argv=base):
        fails_cleanly(capsys, [*argv, *extra], expect)

    fails(["--metrics", "accuracy,magic"], "unknown metric(s) magic; known: accuracy,f1,exact_match")
    fails(["--eval_split", "train[:0]"], "train[:0]")
    fails(["--text_template", "{review} => {tone}"], "template field(s) review not in the data")
    unlabelled = write_jsonl(tmp_path / "u.jsonl", [{"phrase": r["phrase"]} for r in sentiment_rows(4)])
    fails(["-d", str(unlabelled), "--metrics", "accuracy,latency"], "need(s) the reference answers, but the data "
                                                                   "has no 'tone' field")
    fails(["--text_template", "", "--text_field", "phrase", "--metrics", "perplexity,bleu"], "bleu need(s) a prompt")
    fails(["--text_template", "Review: {tone}\\nPhrase: {phrase}", "--metrics", "f1"],
          "accuracy and f1 need a classification task")
    gpt2 = build_model(tokenizer_dir, models_root, "gpt2")
    fails(["-m", str(gpt2), "--adapter_path", str(adapter)], "does not fit model")
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"")
    fails(["-m", str(onnx)], "not an ONNX Runtime GenAI folder")
    (onnx / "genai_config.json").write_text("{}")
    fails(["-m", str(onnx)], "onnxruntime_genai cannot load")
    fails(["--compare", str(tiny_llama)], "--compare names every run itself")
    fails(["--compare", str(tmp_path / "none.json")], "results file not found", argv=["evaluate"])


def test_cli_and_the_evaluate_pass_share_one_output_layout(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "dev.jsonl", sentiment_rows(6, seed=2))
    out = tmp_path / "scores"
    assert main(["evaluate", "-m", str(tiny_llama), "-d", str(data), "--text_template", TEMPLATE, "--metrics",
                 "accuracy", "-o", str(out), "--log_level", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "evaluate" and manifest["results"]["metrics"] == results["metrics"]
    assert manifest["options"]["metrics"] == ["accuracy"] and not (tmp_path / "scores.partial").exists()
    capsys.readouterr()
    assert main(["evaluate", "--compare", str(out), str(out / "results.json")]) == 0  # a folder or its file
    row = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("accuracy")).split()
    assert row[1] == row[2] == f"{results['metrics']['accuracy']:.4f}"
