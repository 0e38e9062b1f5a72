"""A run computes on the cores that are free when it starts: one busy core on two costs a 2-thread run
an order of magnitude (benchmarks in docs/speed.md), one thread only its share."""

from __future__ import annotations

import json

import psutil
import pytest
import torch

from slmops.models import threads


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(threads, "allowed_cores", lambda: [0, 1])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield lambda load: monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: load)
    torch.set_num_threads(before)


def test_a_busy_core_is_left_alone_and_given_back_when_free(two_cores):
    two_cores([99.0, 4.0])
    assert threads.choose_threads(None) == {"threads": 1, "why": "1 of 2 cores busy with other work", "cap": 2}
    assert torch.get_num_threads() == 1
    two_cores([3.0, 4.0])  # the other work ended: the next run takes both again
    assert threads.choose_threads(None) == {"threads": 2, "why": "every core free", "cap": 2}
    assert torch.get_num_threads() == 2
    two_cores([99.0, 99.0])  # never none
    assert threads.choose_threads(None)["threads"] == 1


def test_num_threads_and_omp_num_threads_win(two_cores, monkeypatch):
    two_cores([3.0, 4.0])
    assert threads.choose_threads(1) == {"threads": 1, "why": "--num_threads", "cap": None}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.choose_threads(None) == {"threads": 1, "why": "every core free", "cap": 1}


def test_exported_models_compute_on_the_free_cores_unless_their_config_says(two_cores):
    from slmops.models.genai import genai_overlay

    def threads_of(overlay: dict) -> int:
        return overlay["model"]["decoder"]["session_options"]["intra_op_num_threads"]

    two_cores([3.0, 4.0])
    assert threads_of(genai_overlay({"model": {"decoder": {"session_options": {}}}}, {})) == 2
    two_cores([99.0, 4.0])
    overlay = genai_overlay({"model": {"decoder": {}}}, {"static_batching": {"max_batch_size": 4}})
    assert threads_of(overlay) == 1 and overlay["engine"] == {"static_batching": {"max_batch_size": 4}}
    named = {"model": {"decoder": {"session_options": {"intra_op_num_threads": 3}}}}
    assert genai_overlay(named, {}) == {}  # a count the folder names stands


def test_the_manifest_says_how_many_threads_and_why(tiny_llama, sentiment_file, tmp_path, two_cores):
    from conftest import TEMPLATE
    from slmops import finetune

    out = finetune(model_name_or_path=str(tiny_llama), data_name=str(sentiment_file), text_template=TEMPLATE,
                   output_path=str(tmp_path / "run"), max_steps=1, num_threads=1, report_to="none")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolved"]["cpu_threads"] == {"threads": 1, "why": "--num_threads", "cap": None}
    assert manifest["hardware"]["torch_threads"] == 1
    # and which precision ran, why, and the instruction sets that decided it
    from slmops.artifacts.machine import cpu_features, native_bf16
    assert manifest["hardware"]["cpu"] == json.loads(json.dumps(cpu_features()))
    expected = "bfloat16" if native_bf16() else "float32"
    assert manifest["resolved"]["autocast_dtype"] == expected and manifest["resolved"]["autocast_why"]


@pytest.mark.parametrize("instructions, dtype, why", [
    (["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"], torch.bfloat16, "AMX"),
    (["avx2", "avx512f", "avx512_bf16"], torch.bfloat16, "AVX-512-BF16"),
    (["avx2"], torch.float32, "emulated"),
])
def test_the_precision_follows_the_cpus_instruction_sets(instructions, dtype, why, monkeypatch):
    from slmops.artifacts import machine
    from slmops.options.finetune_options import FinetuneOptions
    from slmops.training import args

    monkeypatch.setattr(machine, "cpu_features", lambda: {"model": "x", "instructions": instructions})
    monkeypatch.setattr(args, "on_gpu", lambda cfg: False)
    opts = FinetuneOptions.build(model_name_or_path="m", text_field="text", output_path="o")
    chosen, reason = args.autocast_dtype(opts)
    assert chosen == dtype and why in reason
    asked = FinetuneOptions.build(model_name_or_path="m", text_field="text", output_path="o", torch_dtype="float32")
    assert args.autocast_dtype(asked) == (torch.float32, "--torch_dtype float32")


class Neighbour:
    """A process as psutil.process_iter yields it: a pid and the CPU it used since the last look."""

    def __init__(self, pid: int, percent: float):
        self.pid, self.percent = pid, percent

    def cpu_percent(self, interval):
        return self.percent


def test_the_threads_follow_other_work_as_it_starts_and_ends(two_cores, monkeypatch):
    load = [Neighbour(7, 0.0)]
    monkeypatch.setattr(psutil, "process_iter", lambda: iter(load))
    torch.set_num_threads(2)
    watch = threads.LoadWatch(cap=2, every_s=0)
    assert watch.check() is None and torch.get_num_threads() == 2  # nothing else running: no change
    load[0].percent = 99.0  # a neighbour takes a core
    assert watch.check() == 1 and torch.get_num_threads() == 1
    load[0].percent = 2.0  # and gives it back
    assert watch.check() == 2 and torch.get_num_threads() == 2
    load[:] = [Neighbour(7, 100.0), Neighbour(8, 100.0), Neighbour(9, 100.0)]
    assert watch.check() == 1  # never fewer than one
    slow = threads.LoadWatch(cap=2, every_s=3600)
    load[:] = [Neighbour(7, 0.0)]
    assert slow.check() is None and torch.get_num_threads() == 1  # checks are spaced: not every step
