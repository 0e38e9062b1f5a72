"""The ONNX Runtime GenAI back end: exported folders (`slmops auto-opt`, `slmops generate-adapter`) served as
they are deployed, int4 included.

Requests for the base go through ONNX Runtime GenAI's own continuous-batching engine (`og.Engine`, static
batching up to --max_batch_size): a request joins or leaves between steps, and a greedy request's tokens are
the ones it gets alone. The engine takes no adapter per request, and ONNX Runtime GenAI binds one adapter per
generator, so a request for an adapter decodes in a generator of its own, stepped in turn with the engine's
batch: correct and concurrent, not batched. Mixed-adapter batching is the PyTorch back end's (docs/serve.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from slmops.errors import first_line
from slmops.models.genai import ADAPTER_SUFFIX, GENAI_CONFIG, adapter_files, load_genai
from slmops.models.tokenizers import load_tokenizer
from slmops.serving.jobs import BASE, Job, Worker
from slmops.serving.pool import AdapterError, Pool

log = logging.getLogger(__name__)


class GenaiPool(Pool):
    """An exported model and the adapters of its folder (adapters/NAME.onnx_adapter), plus any loaded later."""

    def __init__(self, folder: str, served_name: str | None, max_batch: int):
        import onnxruntime_genai as og

        self.og, self.folder = og, Path(folder).expanduser()
        config = json.loads((self.folder / GENAI_CONFIG).read_text())
        self.model = load_genai(self.folder, config, static_batching={"max_batch_size": max_batch})
        eos = config["model"].get("eos_token_id")
        super().__init__(served_name or folder, load_tokenizer(str(self.folder)),
                         set(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                         config["model"]["context_length"])
        self.slots = _lora_inputs(self.folder / config["model"]["decoder"]["filename"])
        self.og_adapters = og.Adapters(self.model) if self.slots else None
        for name, path in adapter_files(self.folder).items():
            self.load(name, str(path))

    def load(self, name: str, path: str) -> None:
        """Check the adapter's tensors against the graph's LoRA inputs, then load it under `name`."""
        self.check_free(name)
        file = Path(path).expanduser()
        if not self.slots:
            raise AdapterError(f"{self.folder} was exported without LoRA inputs, so it takes no adapter; export the "
                               f"base and its adapters together with `slmops generate-adapter`")
        if file.suffix != ADAPTER_SUFFIX or not file.is_file():
            raise AdapterError(f"{path} is not an {ADAPTER_SUFFIX} file; an exported model takes the adapters "
                               f"`slmops generate-adapter` writes (its adapters/ folder)")
        _check_tensors(file, self.slots)
        with self.changing():
            try:
                self.og_adapters.load(str(file), name)
            except RuntimeError as err:
                raise AdapterError(f"{path} cannot be loaded ({first_line(err)[:200]})") from None
            self.adapters[name] = str(file)
        log.info("adapter %s loaded from %s", name, file)

    def unload(self, name: str) -> None:
        self.check_loaded(name)
        with self.changing():
            try:
                self.og_adapters.unload(name)
            except RuntimeError as err:
                raise AdapterError(f"adapter {name!r} cannot be unloaded now ({first_line(err)[:160]}); retry "
                                   f"once its requests have finished") from None
            del self.adapters[name]
        log.info("adapter %s unloaded", name)

    def decoder(self, telemetry: Any, max_batch: int, max_queue: int) -> Worker:
        return EngineWorker(self, telemetry, max_batch, max_queue)


def _lora_inputs(graph: Path) -> dict[str, tuple[list[int | str], int]]:
    """The graph's LoRA inputs: name -> (shape, with the rank as a name; element type)."""
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    return {i.name: ([d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim], i.type.tensor_type.elem_type)
            for i in proto.graph.input if ".lora_" in i.name}


def _check_tensors(file: Path, slots: dict[str, tuple[list[int | str], int]]) -> None:
    """Each tensor must feed a LoRA input of this graph, with its shape and precision (Olive #2277, #1451)."""
    import onnxruntime as ort
    from onnx import helper

    try:
        tensors = ort.AdapterFormat.read_adapter(str(file)).get_parameters()
    except Exception as err:  # noqa: BLE001 - the reader raises its own types for a damaged file
        raise AdapterError(f"{file} is not a readable {ADAPTER_SUFFIX} file ({first_line(err)[:160]})") from None
    for name, value in tensors.items():
        if name not in slots:
            raise AdapterError(f"adapter {file}: {name} is not a LoRA input of this model: it was exported for "
                               f"another base model")
        shape, kind = slots[name]
        want = helper.tensor_dtype_to_np_dtype(kind)
        got_type = value.data_type().removeprefix("tensor(").rstrip(")")
        if np.dtype(want).name != {"float": "float32", "double": "float64"}.get(got_type, got_type):
            raise AdapterError(f"adapter {file}: {name} holds {got_type} and this model takes {np.dtype(want).name}: "
                               f"export the adapter with the model's precision (`slmops generate-adapter`)")
        fixed = [(g, w) for g, w in zip(value.shape(), shape) if isinstance(w, int) and w]
        if len(value.shape()) != len(shape) or any(g != w for g, w in fixed):
            raise AdapterError(f"adapter {file}: {name} is {list(value.shape())} and this model takes {shape}: it "
                               f"was exported for another base model")


class EngineWorker(Worker):
    """Base requests in ONNX Runtime GenAI's engine, adapter requests each in a generator, stepped in turn."""

    def __init__(self, pool: GenaiPool, telemetry: Any, max_batch: int, max_queue: int):
        super().__init__(pool, telemetry, max_batch, max_queue)
        self.og = pool.og
        self.engine: Any = None  # made in the decoding thread: ONNX Runtime GenAI's engine is bound to one
        self.events: Any = None
        self.admitting: list[Job] = []
        self.batched: dict[int, Job] = {}  # id(og request) -> job
        self.solo: list[Job] = []  # adapter requests, each with its generator in job.state

    def _serve_once(self) -> None:
        busy = bool(self.batched or self.solo)
        jobs = self._next(self.max_batch - len(self.batched) - len(self.solo), wait=not busy)
        if self.engine is None:
            self.engine = self.og.Engine(self.pool.model)
            self.events = self.engine.create_event_buffer(4 * self.max_batch)
        self.admitting = jobs
        with self.pool.lock:
            for job in jobs:
                self._admit(job)
            if jobs:
                self.telemetry.batch_size.observe(len(self.batched) + len(self.solo))
            for job in [*self.batched.values(), *self.solo]:
                if self._gone(job):
                    self._close(job)
            if self.engine.has_pending_requests():
                self._run_engine()
            for job in list(self.solo):
                self._step_solo(job)

    def _admit(self, job: Job) -> None:
        if job.adapter == BASE:
            request = self.engine.create_request()
            turn = self.og.TurnOptions(request)
            turn.set_max_generated_tokens(job.max_tokens)
            turn.set_temperature(job.temperature)
            if job.temperature > 0:
                turn.set_do_sample(True)
                turn.set_top_p(job.top_p)
                if job.seed is not None:
                    turn.set_seed(job.seed)
            if job.ignore_eos:
                turn.set_min_generated_tokens(job.max_tokens)
            job.state = (request, request.begin_turn(np.asarray(job.prompt, dtype=np.int32), turn))
            self.batched[id(request)] = job
            return
        params = self.og.GeneratorParams(self.pool.model)
        search: dict[str, Any] = {"max_length": min(len(job.prompt) + job.max_tokens, self.pool.context)}
        if job.temperature > 0:
            search.update(do_sample=True, temperature=job.temperature, top_p=job.top_p, top_k=0)
            if job.seed is not None:
                search["random_seed"] = job.seed
        if job.ignore_eos:
            search["min_length"] = search["max_length"]
        params.set_search_options(**search)
        generator = self.og.Generator(self.pool.model, params)
        generator.set_active_adapter(self.pool.og_adapters, job.adapter)
        generator.append_tokens(np.asarray(job.prompt, dtype=np.int32))
        job.state = generator
        self.solo.append(job)

    def _run_engine(self) -> None:
        flags = self.og.EngineEventFlags
        for event in self.engine.run(self.events):
            job = self.batched.get(id(event.request))
            if job is None:
                continue
            if event.flags.value & flags.FAILED.value:
                job.fail(f"the engine failed this request ({event.error_code.name})")
            elif event.flags.value & flags.TOKEN.value:
                self._emit(job, int(event.token))
            if event.flags.value & flags.TURN_FINISHED.value:
                job.end("stop" if event.finish_reason.name in ("EOS", "STOP_STRING") else "length")
            if job.ended:
                self._close(job)

    def _step_solo(self, job: Job) -> None:
        generator = job.state
        generator.generate_next_token()
        if self._emit(job, int(generator.get_next_tokens()[0])) or generator.is_done():
            job.end("length")
            self._close(job)

    def _close(self, job: Job) -> None:
        """Free the request's place at once: its engine turn cancelled and closed, or its generator dropped."""
        if job.adapter == BASE:
            request, turn = job.state
            if self.batched.pop(id(request), None) is not None:
                request.cancel_turn(turn)
                request.close()
        elif job in self.solo:
            self.solo.remove(job)
            job.state = None

    def _fail(self, message: str) -> None:
        for job in [*self.admitting, *self.batched.values(), *self.solo]:
            job.fail(message)
        self.batched, self.solo, self.engine = {}, [], None  # a fresh engine next: the failed one's state is unknown
