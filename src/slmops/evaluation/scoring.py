"""`slmops evaluate` and the Evaluate pass: render the data as `finetune` does, decide the task, ask a
backend, compute metrics, write results.json and manifest.json.

A response field with a few repeating values is a label, and the model is asked which label fits
(by likelihood, or by greedy generation); anything else is a generation task scored against the
references. Everything model-specific sits behind `Backend`, so PyTorch and ONNX results compare.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tqdm.auto import tqdm

from slmops.artifacts.folders import publish, work_dir, write_json
from slmops.artifacts.manifest import hardware, versions, write_manifest
from slmops.data.formatting import Template
from slmops.data.prepare import MAX_STRATIFY_CLASSES, drop_empty
from slmops.data.sources import load_split
from slmops.errors import UsageError
from slmops.evaluation import metrics as M
from slmops.evaluation.backends import Backend, load_backend
from slmops.models.adapters import model_and_adapter
from slmops.options.evaluate_options import EvaluateOptions

NEEDS_RESPONSE = ("accuracy", "f1", "exact_match", "perplexity", "bleu", "rouge")
NEEDS_PREDICTIONS = ("accuracy", "f1", "exact_match", "bleu", "rouge", "throughput")
DEFAULTS = {"classification": ("accuracy", "f1"), "generation": ("exact_match", "bleu", "rouge"),
            "text": ("perplexity",)}
LATENCY_ROWS = 50  # requests timed one at a time, after one untimed warm-up request
GENERATION_TOKENS = 128


@dataclass
class EvalData:
    task: str  # classification, generation, or text (whole texts, no prompt: perplexity only)
    prompts: list[str]  # the template's prompt part, rendered (empty for "text")
    references: list[str]  # the response field's values (empty when the data has no such field)
    texts: list[str]  # whole rendered texts (empty without references)
    labels: list[str]  # the classes, for classification
    response: str  # the template's response field
    stop: str  # the template's text after the response: where a generated answer ends
    fingerprint: str


def evaluate(opts: EvaluateOptions, progress: bool = True) -> dict[str, Any]:
    """Score a model (plus adapter) on one split: `eval_split`, else `train_split` (by default all rows of a
    file). Returns what results.json holds, so runs on other backends or other days compare side by side."""
    start = time.perf_counter()
    model_name_or_path, adapter, onnx_adapter = model_and_adapter(opts.model_name_or_path, opts.adapter_path)
    split = opts.eval_split or opts.train_split
    ev = load_data(opts, split)
    wanted = opts.metrics or list(DEFAULTS[ev.task])
    _check_task(wanted, ev)
    predict, batch_size = opts.predict, opts.batch_size

    backend = load_backend(model_name_or_path, adapter, opts.trust_remote_code, onnx_adapter)
    values: dict[str, Any] = {}
    out: dict[str, Any] = {"model": model_name_or_path, "adapter": str(adapter) if adapter else onnx_adapter,
                           "backend": backend.name, "task": ev.task, "labels": ev.labels or None}
    if ev.task != "text":
        mode, prompts, request, new_tokens = _requests(backend, ev, predict, opts.max_new_tokens)
        out["predict"] = mode
        if new_tokens:
            out["max_new_tokens"] = new_tokens
    if set(wanted) & set(NEEDS_PREDICTIONS):
        rows_per_call = max(1, batch_size // len(ev.labels)) if mode == "likelihood" else batch_size
        answers, seconds = _map(request, prompts, rows_per_call, progress, "predicting")
        predictions = [_cut(a, ev.stop) for a in answers]
        if ev.task == "classification" and mode == "generate":
            predictions = [M.to_label(p, ev.labels) for p in predictions]
        values.update(_quality(wanted, predictions, ev, out))
    if "perplexity" in wanted:
        values.update(_perplexity(backend, ev, batch_size, progress))
    if "latency" in wanted:
        took = [_timed(request, [p])[1] for p in prompts[:LATENCY_ROWS + 1]]
        values.update(M.latency(took[1:] or took))
    if "throughput" in wanted:  # prompt tokens read plus tokens generated, in the batched pass
        written = answers if mode == "generate" else []
        values["throughput_tokens_per_s"] = M.throughput(sum(backend.count_tokens(prompts + written)), seconds)
    wall = time.perf_counter() - start
    return {**out, "metrics": values,
            "data": {"data_name": opts.data_name, "data_files": opts.data_files, "split": split,
                     "text_template": opts.text_template, "text_field": opts.text_field,
                     "rows": len(ev.prompts or ev.texts), "fingerprint": ev.fingerprint},
            "options": {"metrics": wanted, "batch_size": batch_size},
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "wall_s": round(wall, 1),
            "versions": {**versions(), **{p: _version(p) for p in ("sacrebleu", "rouge-score")}},
            "hardware": hardware()}


def load_data(cfg: EvaluateOptions, split: str) -> EvalData:
    """The split's rows, rendered with the template; the task follows from the response's values."""
    if cfg.use_chat_template:
        raise UsageError("evaluate takes --text_template (or --text_field, for perplexity only); "
                         "--use_chat_template is not supported yet")
    rows = load_split(cfg.data_name, cfg.data_files, split, cfg.eval_subset or cfg.train_subset)
    columns = rows.column_names
    if cfg.text_field:
        if cfg.text_field not in columns:
            raise UsageError(f"--text_field: column {cfg.text_field!r} not in the data; fields present: "
                             f"{', '.join(columns)}")
        texts = [str(t) for t in _first(drop_empty(rows, [cfg.text_field], split), cfg.max_samples)[cfg.text_field]]
        return EvalData("text", [], [], texts, [], "", "", _fingerprint(texts))
    template = Template.parse(cfg.text_template or "")
    response = template.response_field
    if any(f not in columns and f != response for f in template.fields):
        template.check_columns(columns)  # raises, naming every missing field
    labelled = response in columns
    rows = drop_empty(rows, [f for f in dict.fromkeys(template.fields) if f in columns], split)
    classes = sorted(set(map(str, rows[response]))) if labelled else []
    classification = 0 < len(classes) <= MAX_STRATIFY_CLASSES and len(classes) < len(rows)
    rows = _first(rows, cfg.max_samples)
    prompts = [template.prompt_part.format_map(r) for r in rows]
    texts = [template(r)[0] for r in rows] if labelled else []
    stop = template.text.format_map({**rows[0], response: ""})[len(prompts[0]):].strip()
    return EvalData("classification" if classification else "generation", prompts,
                    [str(r[response]) for r in rows] if labelled else [], texts,
                    classes if classification else [], response, stop, _fingerprint(texts or prompts))


def evaluate_and_save(opts: EvaluateOptions, progress: bool = True) -> dict[str, Any]:
    """Evaluate, then write the results where --output_path says (`save_results`)."""
    results = evaluate(opts, progress)
    if opts.output_path:
        save_results(results, opts)
    return results


def save_results(results: dict[str, Any], opts: EvaluateOptions) -> Path:
    """OUT/results.json and OUT/manifest.json, published whole; a path ending in .json gets the results
    file alone (written atomically), for `--compare` tables."""
    out = Path(opts.output_path).expanduser()
    if out.suffix == ".json":
        return write_json(out, results)
    work = work_dir(out)
    write_json(work / "results.json", results)
    write_manifest(work / "manifest.json", "evaluate", opts.model_dump(), {}, results["data"],
                   {"metrics": results["metrics"]})
    publish(work, out)
    return out


def _check_task(wanted: list[str], ev: EvalData) -> None:
    if ev.task == "text":
        other = [m for m in wanted if m != "perplexity"]
        if other:
            raise UsageError(f"--metrics {','.join(other)} need(s) a prompt and a response: use --text_template, "
                             f"whose last placeholder is the response (--text_field gives perplexity only)")
        return
    missing = [m for m in wanted if m in NEEDS_RESPONSE]
    if not ev.references and missing:
        raise UsageError(f"--metrics {','.join(missing)} need(s) the reference answers, but the data has no "
                         f"{ev.response!r} field (the template's response); evaluate labelled rows, or ask only "
                         f"for --metrics latency,throughput")
    if ev.task == "generation" and {"accuracy", "f1"} & set(wanted):
        raise UsageError(f"accuracy and f1 need a classification task, but {ev.response!r} takes "
                         f"{len(set(ev.references))} distinct values in {len(ev.references)} rows (a label takes "
                         f"at most {MAX_STRATIFY_CLASSES} that repeat); use exact_match, bleu or rouge")


def _requests(backend: Backend, ev: EvalData, predict: str, max_new_tokens: int | None
              ) -> tuple[str, list[str], Callable[[list[str]], list[str]], int | None]:
    """How a batch of rows is answered: the mode, the prompts, the call, and the generation budget."""
    if ev.task == "classification" and predict == "likelihood":
        # each prompt is tokenized together with each label, as in training
        return "likelihood", ev.prompts, lambda batch: _likeliest(backend, batch, ev.labels), None
    tokens = max_new_tokens or (max(backend.count_tokens(ev.labels)) + 2 if ev.labels else GENERATION_TOKENS)
    prompts = [p.rstrip(" ") for p in ev.prompts]  # a trailing space belongs to the answer's first token
    return "generate", prompts, lambda batch: backend.generate(batch, tokens), tokens


def _likeliest(backend: Backend, prompts: list[str], labels: list[str]) -> list[str]:
    """Each prompt's label with the highest log-probability."""
    scores = backend.continuation_logprobs([p for p in prompts for _ in labels],
                                           [label for _ in prompts for label in labels])
    k = len(labels)
    return [labels[max(range(k), key=lambda j: scores[i * k + j].logprob)] for i in range(len(prompts))]


def _quality(wanted: list[str], predictions: list[str], ev: EvalData, out: dict[str, Any]) -> dict[str, float]:
    """The metric values; per-class scores and the confusion matrix go into `out` beside them."""
    values = {}
    if "accuracy" in wanted:
        values["accuracy"] = M.accuracy(predictions, ev.references)
    if "f1" in wanted:
        out["per_class"] = M.per_class(predictions, ev.references, ev.labels)
        values["f1"] = M.macro_f1(out["per_class"])
        columns, matrix = M.confusion_matrix(predictions, ev.references, ev.labels)
        out["confusion"] = {"true": ev.labels, "predicted": columns, "counts": matrix}
    if "exact_match" in wanted:
        values["exact_match"] = M.exact_match(predictions, ev.references)
    if "bleu" in wanted:
        values["bleu"] = M.bleu(predictions, ev.references)
    if "rouge" in wanted:
        values.update(M.rouge(predictions, ev.references))
    return values


def _perplexity(backend: Backend, ev: EvalData, batch_size: int, progress: bool) -> dict[str, float]:
    """On whole texts, and (with a template) on the response tokens alone: what `finetune`'s loss covers."""
    nll, count = 0.0, 0
    for idx in _batches(ev.texts, batch_size, progress, "perplexity"):
        part = backend.text_nll([ev.texts[i] for i in idx])
        nll, count = nll + part[0], count + part[1]
    values = {"perplexity": M.perplexity(nll, count)}
    if ev.task != "text":
        pairs = [(p, t[len(p):]) for p, t in zip(ev.prompts, ev.texts)]
        scored, _ = _map(lambda b: backend.continuation_logprobs(*zip(*b)), pairs, batch_size, progress,
                         "response perplexity")
        values["response_perplexity"] = M.perplexity(-sum(s.logprob for s in scored), sum(s.tokens for s in scored))
    return values


def _batches(items: Sequence[Any], size: int, progress: bool, desc: str) -> Iterator[list[int]]:
    """Indices in batches of similar length (less padding), with a progress bar counting rows."""
    order = sorted(range(len(items)), key=lambda i: -len(str(items[i])))
    with tqdm(total=len(items), desc=desc, unit="row", disable=not progress) as bar:
        for lo in range(0, len(order), size):
            yield order[lo: lo + size]
            bar.update(len(order[lo: lo + size]))


def _map(fn: Callable[[list], list], items: Sequence[Any], size: int, progress: bool,
         desc: str) -> tuple[list, float]:
    """`fn` over batches, results back in input order, and the seconds spent inside `fn`."""
    results: list = [None] * len(items)
    seconds = 0.0
    for idx in _batches(items, size, progress, desc):
        answers, took = _timed(fn, [items[i] for i in idx])
        seconds += took
        for i, answer in zip(idx, answers):
            results[i] = answer
    return results, seconds


def _timed(fn: Callable[[list], list], batch: list) -> tuple[list, float]:
    start = time.perf_counter()
    answers = fn(batch)
    return answers, time.perf_counter() - start


def _cut(answer: str, stop: str) -> str:
    return (answer.split(stop)[0] if stop else answer).strip()


def _first(rows: Any, n: int | None) -> Any:
    return rows.select(range(min(n, len(rows)))) if n else rows


def _fingerprint(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
