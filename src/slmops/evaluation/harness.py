"""`slmops benchmark`: EleutherAI's lm-evaluation-harness runs the tasks and computes the metrics; this module
is the model class it calls (`slmops`, registered with the harness), over the same backends as `slmops
evaluate`, so one task list scores a PyTorch model, a model plus adapter and an exported ONNX Runtime GenAI
folder side by side.

The harness asks three things of a model: the log-likelihood of a continuation (multiple choice), of a whole
text (perplexity), and greedy generation up to stop strings. Each maps onto one backend call.
"""

from __future__ import annotations

import functools
import json
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import lm_eval.models  # noqa: F401  the harness fills its registry only while it is empty: its own classes first
import yaml
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from slmops.artifacts.folders import publish, work_dir, write_json
from slmops.artifacts.report import write_report
from slmops.artifacts.manifest import write_manifest
from slmops.errors import UsageError, first_line
from slmops.evaluation.backends import Backend, load_backend
from slmops.models.adapters import locate, model_and_adapter, split_spec
from slmops.models.genai import is_genai_folder
from slmops.options.benchmark_options import BenchmarkOptions


@register_model("slmops")
class SlmopsLM(LM):
    """lm-eval's model interface over a backend. From lm-eval itself: `--model slmops --model_args
    pretrained=MODEL,adapter=ADAPTER` after `import slmops.evaluation.harness`."""

    def __init__(self, pretrained: str | None = None, adapter: str | None = None, batch_size: int | str = 8,
                 trust_remote_code: bool = False, backend: Backend | None = None, **_ignored: Any):
        super().__init__()
        if backend is None:
            model, peft_adapter, onnx_adapter = model_and_adapter(pretrained, adapter)
            backend = load_backend(model, peft_adapter, bool(trust_remote_code), onnx_adapter)
        self.backend = backend
        self.size = int(batch_size) if str(batch_size).isdigit() else 8  # the harness may pass "auto"
        tok = backend.tokenizer
        # what the harness's own Hugging Face class puts before a text that has no context: BOS, else EOS
        self.prefix = tok.bos_token if tok.bos_token is not None else tok.eos_token

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [(context or self.prefix, continuation) for context, continuation in (r.args for r in requests)]
        scores = self._in_batches(pairs, lambda batch: self.backend.continuation_logprobs(*zip(*batch)))
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text scored whole after the prefix token, in one pass (up to the model's context length)."""
        pairs = [(self.prefix, r.args[0]) for r in requests]
        scores = self._in_batches(pairs, lambda batch: self.backend.continuation_logprobs(*zip(*batch)))
        return [s.logprob for s in scores]

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (as the harness's tasks ask for reproducible scores), cut at the first stop string."""
        out: list[str] = [""] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(int(r.args[1].get("max_gen_toks", 256)), []).append(i)
        for tokens, idx in groups.items():
            texts = self._in_batches([requests[i].args[0] for i in idx],
                                     lambda batch, n=tokens: self.backend.generate(batch, n))
            for i, text in zip(idx, texts):
                until = requests[i].args[1].get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    text = text.split(stop)[0] if stop else text
                out[i] = text
        return out

    def _in_batches(self, items: list[Any], call: Any) -> list[Any]:
        """Longest first, so a batch pads little; answers back in the requests' order."""
        order = sorted(range(len(items)), key=lambda i: -len(str(items[i])))
        answers: list[Any] = [None] * len(items)
        for lo in range(0, len(order), self.size):
            idx = order[lo:lo + self.size]
            for i, answer in zip(idx, call([items[i] for i in idx])):
                answers[i] = answer
        return answers


def run_benchmark(opts: BenchmarkOptions) -> dict[str, Any]:
    """Every model on every task; returns (and with --output_path writes) the table and lm-eval's results."""
    import lm_eval

    specs = [split_spec(item) for item in opts.compare] or [(opts.model_name_or_path, opts.adapter_path)]
    for model_name, adapter_path in specs[1:]:  # a model that cannot be had fails now, not after the first's scores
        model, _, onnx_adapter = locate(model_name, adapter_path)
        if is_genai_folder(model):
            load_backend(model, None, opts.trust_remote_code, onnx_adapter)  # seconds: catches a broken graph
    manager, names = _task_manager(opts.tasks)
    with _hub_or_offline():
        _check_tasks(names, manager)
    runs = []
    for model_name, adapter_path in specs:
        start = time.perf_counter()
        model, adapter, backend = _open(opts, model_name, adapter_path)
        lm = SlmopsLM(batch_size=opts.batch_size, backend=backend)
        with _hub_or_offline():
            raw = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=opts.num_fewshot,
                                          limit=opts.limit, log_samples=False, random_seed=opts.seed,
                                          numpy_random_seed=opts.seed, torch_random_seed=opts.seed,
                                          fewshot_random_seed=opts.seed)
        runs.append({"model": model, "adapter": adapter, "backend": lm.backend.name,
                     "seconds": round(time.perf_counter() - start, 2), "results": _plain(raw)})
    summary = {"tasks": names, "limit": opts.limit, "num_fewshot": opts.num_fewshot,
               "models": [{k: v for k, v in r.items() if k != "results"} for r in runs],
               "scores": [scores(r["results"]) for r in runs]}
    if opts.output_path:
        _save(Path(opts.output_path).expanduser(), opts, runs, summary)
    for run_dir in {Path(p).expanduser() for spec in specs for p in spec if p}:  # a finetune output folder's
        if (run_dir / "manifest.json").is_file() and (run_dir / "report.html").is_file():  # page shows the table
            write_json(run_dir / "benchmark.json", summary)
            write_report(run_dir)
    return summary


def scores(raw: dict[str, Any]) -> dict[str, dict[str, list[float | None]]]:
    """task -> metric -> [value, standard error], from lm-eval's `results` (its keys: 'acc,none', ...)."""
    table: dict[str, dict[str, list[float | None]]] = {}
    for task, values in raw.get("results", {}).items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            name = metric if filt == "none" else f"{metric} ({filt})"
            stderr = values.get(f"{metric}_stderr,{filt}")
            table.setdefault(task, {})[name] = [value, stderr if isinstance(stderr, (int, float)) else None]
    return table


def _open(opts: BenchmarkOptions, model_name: str | None, adapter_path: str | None
          ) -> tuple[str, str | None, Backend]:
    """The model (the adapter's recorded base where none is named), the adapter, and their backend."""
    model, adapter, onnx_adapter = model_and_adapter(model_name, adapter_path)
    exported = is_genai_folder(model)
    if opts.backend != "auto" and (opts.backend in ("ort", "ortgenai")) != exported:
        raise UsageError(f"--backend {opts.backend}: {model} is " + (
            "an exported ONNX Runtime GenAI folder; use --backend ortgenai or auto" if exported else
            "not an exported folder; export it with `slmops auto-opt`, or use --backend torch or auto"))
    import torch
    if opts.device == "gpu" and not exported and not torch.cuda.is_available():
        raise UsageError("--device gpu: no CUDA device is visible to PyTorch; use --device cpu or auto")
    cuda = None if opts.device == "auto" else opts.device == "gpu"
    backend = load_backend(model, adapter, opts.trust_remote_code, onnx_adapter, cuda)
    return model, str(adapter) if adapter else onnx_adapter, backend


class _TaskLoader(yaml.SafeLoader):
    """Reads a task YAML for its name without running the `!function` code lm-eval itself imports."""


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _task_manager(tasks: list[str]) -> tuple[Any, list[str]]:
    """lm-eval's task index, with the folders of the task YAMLs given by path; and the tasks' names."""
    from lm_eval.tasks import TaskManager

    folders, names = [], []
    for item in tasks:
        path = Path(item).expanduser()
        if path.suffix in (".yaml", ".yml") or path.is_dir():
            if not path.exists():
                raise UsageError(f"--tasks: {item} does not exist; pass a task YAML file, a folder of them, or a "
                                 f"task name of lm-eval's")
            folders.append(str(path if path.is_dir() else path.parent))
            names += _names_in(path)
        else:
            names.append(item)
    return TaskManager(include_path=folders or None, verbosity="ERROR"), list(dict.fromkeys(names))


def _names_in(path: Path) -> list[str]:
    names = []
    for file in [path] if path.is_file() else sorted(path.rglob("*.y*ml")):
        try:
            config = yaml.load(file.read_text(encoding="utf-8"), Loader=_TaskLoader)  # noqa: S506 (safe subclass)
        except (OSError, yaml.YAMLError) as err:
            raise UsageError(f"--tasks: cannot read {file} ({first_line(err)}); fix the YAML") from None
        name = (config or {}).get("task") or (config or {}).get("group") if isinstance(config, dict) else None
        if isinstance(name, str):
            names.append(name)
        elif path.is_file():
            raise UsageError(f"--tasks: {file} names no task (a top-level `task:` key); see docs/benchmark.md")
    return names


def _check_tasks(names: list[str], manager: Any) -> None:
    """Each task built once on its own before any model runs, so a task that cannot be had is named in one
    line (the harness would stop on the first, deep in a traceback)."""
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise UsageError(f"--tasks: unknown task(s) {', '.join(unknown)}: neither lm-eval's nor in the YAML files "
                         f"given; `lm-eval ls tasks` lists lm-eval's, or pass a task YAML's path")
    for name in names:
        try:
            manager.load([name])
        except (ConnectionError, FileNotFoundError, OSError) as err:
            raise UsageError(f"--tasks: task {name!r} could not load its data ({first_line(err)[:160]}); where the "
                             f"Hugging Face Hub cannot be reached, point a task YAML at local files (dataset_path: "
                             f"json, data_files; see docs/benchmark.md)") from None


@contextmanager
def _hub_or_offline() -> Iterator[None]:
    """Where the Hub cannot be reached, datasets and the hub client go offline at once (cache only) instead
    of retrying for half a minute a task."""
    import datasets
    import huggingface_hub

    constants = huggingface_hub.constants
    if constants.HF_HUB_OFFLINE or _reachable(constants.ENDPOINT):
        yield
        return
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


@functools.lru_cache(maxsize=None)
def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Asked once a process: each model's run would otherwise wait out the same timeout again."""
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    name, _, port = host.partition(":")
    try:
        socket.create_connection((name, int(port or 443)), timeout=timeout).close()
        return True
    except OSError:
        return False


def _plain(raw: dict[str, Any] | None) -> dict[str, Any]:
    """lm-eval's results as plain JSON (its own serializer for what JSON lacks)."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(raw or {}, default=handle_non_serializable))


def _save(out: Path, opts: BenchmarkOptions, runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    work = work_dir(out)
    for i, run in enumerate(runs, start=1):
        write_json(work / "lm_eval" / f"{i}.json", run["results"])
    write_json(work / "benchmark.json", summary)
    write_manifest(work / "manifest.json", "benchmark", opts.model_dump(), {"tasks": summary["tasks"]}, {},
                   {"scores": summary["scores"]})
    publish(work, out)
