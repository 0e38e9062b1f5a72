"""`slmops serve` on loopback, driven by the official `openai` client: the API's shape, adapters as model
ids loaded and unloaded at run time, mixed-adapter batches that answer as each request alone, the API
key, limits, a volley of bad requests while valid ones stream, and a drain on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import TEMPLATE, sentiment_rows, write_jsonl

openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(*args: str):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "slmops", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            time.sleep(0.3)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    log = proc.stdout.read()
    assert "Traceback" not in log and "batch failed" not in log, log[-3000:]


def post(url: str, path: str, body: bytes | dict, key: str | None = None) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data, headers), timeout=60) as r:
            text = r.read().decode()
            return r.status, json.loads(text) if text.startswith("{") else text
    except urllib.error.HTTPError as err:
        text = err.read().decode()
        return err.code, json.loads(text) if text.startswith("{") else text


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    from slmops import finetune

    root = tmp_path_factory.mktemp("serve")
    data = write_jsonl(root / "d.jsonl", sentiment_rows(32))
    return {name: finetune(model_name_or_path=str(tiny_llama), data_name=str(data), text_template=TEMPLATE,
                           output_path=str(root / name), max_steps=3, learning_rate=lr, seed=seed, lora_r=4,
                           report_to="none", eval_on_start=False, eval_strategy="no", per_device_train_batch_size=8)
            for name, lr, seed in (("tone", 5e-2, 1), ("mood", 3e-2, 2))}


@pytest.fixture(scope="module")
def live(tiny_llama, adapters):
    with server(str(tiny_llama), "--adapters", f"tone={adapters['tone']},mood={adapters['mood']}",
                "--served_model_name", "base", "--max_batch_size", "8") as (url, proc):
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


PROMPTS = ["Review: good film very\nTone:", "Review: awful plot not\nTone:", "the actor was quite", "a sad long"]


def test_models_chat_and_completions_streamed_or_whole(live):
    url, client = live
    assert [m.id for m in client.models.list().data] == ["base", "tone", "mood"]
    for model in ("base", "tone"):
        whole = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "good film"}],
                                               max_tokens=6, temperature=0)
        assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
        assert whole.usage.completion_tokens <= 6 and whole.usage.prompt_tokens > 0
        parts = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "good film"}],
                                               max_tokens=6, temperature=0, stream=True,
                                               stream_options={"include_usage": True})
        chunks = list(parts)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == whole.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens
        text = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=5, temperature=0)
        assert text.object == "text_completion" and text.choices[0].finish_reason in ("stop", "length")
    seeded = [client.completions.create(model="base", prompt=PROMPTS[2], max_tokens=8, temperature=1.0, seed=7)
              .choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]  # a seed gives the same draw again
    metrics = urllib.request.urlopen(f"{url}/metrics").read().decode()
    assert "slmops_time_to_first_token_seconds_bucket" in metrics and 'model="tone"' in metrics


def test_mixed_adapters_batched_answer_as_each_alone(live):
    url, client = live
    requests = [(model, prompt) for model in ("base", "tone", "mood") for prompt in PROMPTS[:3]]

    def ask(model: str, prompt: str) -> str:
        return client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0).choices[0].text

    alone = [ask(m, p) for m, p in requests]
    before = _batch_counts(url)
    together: list[str | None] = [None] * len(requests)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(*requests[i])))
               for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    after = _batch_counts(url)
    assert after[1] - before[1] < after[0] - before[0]  # some batch held more than one request
    assert len(set(alone)) > 1  # the adapters answer differently: the rows were not all one model


def test_requests_join_a_running_batch_and_answer_as_alone(tiny_llama, adapters):
    """In process, so the timing is exact: three requests wait while a long one decodes; they join its batch
    after its first step, and every answer is token for token the one it gets alone."""
    from slmops.serving.pool import ModelPool
    from slmops.serving.jobs import Job
    from slmops.serving.scheduler import Scheduler
    from slmops.serving.telemetry import Telemetry

    pool = ModelPool(str(tiny_llama), "base")
    for name in ("tone", "mood"):
        pool.load(name, str(adapters[name]))
    tok = pool.tokenizer

    def job(adapter: str, prompt: str, tokens: int) -> Job:
        return Job(adapter, adapter if adapter != "base" else "__base__", tok(prompt)["input_ids"], tokens,
                   ignore_eos=True)

    def answer(j: Job) -> list[int]:
        assert j.events.get_nowait()[0] in ("text", "end")
        return j.generated

    plan = [("mood", PROMPTS[2], 30), ("tone", PROMPTS[0], 10), ("base", PROMPTS[3], 7), ("mood", PROMPTS[1], 9)]
    scheduler = Scheduler(pool, Telemetry(), max_batch=4, max_queue=8)
    alone = []
    for p in plan:
        j = job(*p)
        scheduler._decode([j])
        alone.append(answer(j))
    together = [job(*p) for p in plan]
    for j in together[1:]:
        scheduler.submit(j)  # waiting while the first decodes
    scheduler._decode(together[:1])
    assert [answer(j) for j in together] == alone
    assert scheduler.telemetry.registry.get_sample_value("slmops_batch_joins_total") == 3 and [len(a) for a in alone] == [30, 10, 7, 9]


def test_a_waiting_adapter_change_stops_a_batch_admitting_arrivals(tiny_llama):
    """So that loading or unloading an adapter under constant load waits one batch, not forever."""
    from slmops.serving.pool import ModelPool
    from slmops.serving.jobs import Job
    from slmops.serving.scheduler import Scheduler
    from slmops.serving.telemetry import Telemetry

    pool = ModelPool(str(tiny_llama))
    scheduler = Scheduler(pool, Telemetry(), max_batch=4, max_queue=4)
    ids = pool.tokenizer(PROMPTS[0])["input_ids"]
    arrival = Job("m", "__base__", ids, 5, ignore_eos=True)
    scheduler.submit(arrival)
    pool.pending = 1  # an adapter load is waiting for the lock
    scheduler._decode([Job("m", "__base__", ids, 8, ignore_eos=True)])
    assert not arrival.generated and scheduler.waiting.qsize() == 1
    pool.pending = 0
    scheduler._decode([Job("m", "__base__", ids, 8, ignore_eos=True)])
    assert len(arrival.generated) == 5 and scheduler.waiting.qsize() == 0


def test_a_request_that_goes_away_leaves_the_batch_at_the_next_step(tiny_llama):
    from slmops.serving.pool import ModelPool
    from slmops.serving.jobs import Job
    from slmops.serving.scheduler import Scheduler
    from slmops.serving.telemetry import Telemetry

    pool = ModelPool(str(tiny_llama))
    scheduler = Scheduler(pool, Telemetry(), max_batch=4, max_queue=4)
    ids = pool.tokenizer(PROMPTS[0])["input_ids"]
    gone, stays = Job("m", "__base__", ids, 50, ignore_eos=True), Job("m", "__base__", ids, 20, ignore_eos=True)

    at_hang_up: list[int] = []

    def hang_up(event) -> None:  # the client disconnects once three tokens are out
        gone.events.put(event)
        if len(gone.generated) >= 3 and not gone.cancelled.is_set():
            at_hang_up.append(len(gone.generated))
            gone.cancelled.set()

    gone.emit = hang_up
    scheduler._decode([gone, stays])
    assert len(gone.generated) == at_hang_up[0] < 50 and list(gone.events.queue)[-1] == ("end", "cancelled")
    assert len(stays.generated) == 20 and list(stays.events.queue)[-1] == ("end", "length")


def _batch_counts(url: str) -> tuple[float, float]:
    """(requests decoded, batch steps of one request) from /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    total = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("slmops_batch_size_sum")))
    ones = float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith('slmops_batch_size_bucket{le="1.0"}')))
    return total, ones


def test_adapters_load_and_unload_at_run_time(live, adapters, tokenizer_dir, tmp_path):
    url, client = live
    assert post(url, "/v1/load_lora_adapter", {"lora_name": "again", "lora_path": str(adapters["tone"])})[0] == 200
    assert "again" in [m.id for m in client.models.list().data]
    same = [client.completions.create(model=m, prompt=PROMPTS[1], max_tokens=8, temperature=0).choices[0].text
            for m in ("tone", "again")]
    assert same[0] == same[1]
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "again"})[0] == 200
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="again", prompt="x", max_tokens=2)
    # an adapter trained on another base is a 400 naming the layer, never a crash mid-batch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmops import finetune
    other = tmp_path / "wider"  # another base: hidden size 96, not the served model's 64
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256)).save_pretrained(other)
    tok.save_pretrained(other)
    alien = finetune(model_name_or_path=str(other), data_name=str(write_jsonl(tmp_path / "d.jsonl",
                                                                             sentiment_rows(8))),
                     text_template=TEMPLATE, output_path=str(tmp_path / "alien"), max_steps=1, lora_r=2,
                     target_modules=["q_proj"], eval_on_start=False)
    status, body = post(url, "/v1/load_lora_adapter", {"lora_name": "alien", "lora_path": str(alien)})
    assert status == 400 and "trained on a different base model" in body["error"]["message"], body
    status, body = post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path)})
    assert status == 400 and "no adapter_config.json" in body["error"]["message"]
    status, body = post(url, "/v1/load_lora_adapter", {"lora_name": "tone", "lora_path": str(adapters["mood"])})
    assert status == 400 and "taken" in body["error"]["message"]
    assert [m.id for m in client.models.list().data] == ["base", "tone", "mood"]


def test_bad_requests_are_answered_while_valid_ones_stream(live):
    url, client = live
    done: list[str] = []

    def stream() -> None:
        chunks = list(client.chat.completions.create(model="mood", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=40, temperature=0, stream=True))
        done.append(chunks[-1].choices[0].finish_reason)

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    chat = "/v1/chat/completions"
    volley = [
        (b"{not json", 400, "not valid JSON"),
        ({"model": "base", "messages": "hello"}, 422, "messages"),
        ({"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
        ({"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "base", "messages": []}, 400, "messages is empty"),
        ({"model": "base", "messages": [{"role": "user", "content": "good " * 400}]}, 400, "the prompt is"),
        (b'{"model": "base", "messages": [], "pad": "' + b"x" * (2 << 20) + b'"}', 413, "limit"),
        ([1, 2], 400, "JSON object"),
    ]
    for body, status, text in volley:
        got, answer = post(url, chat, body)
        assert got == status and text in answer["error"]["message"], (body if isinstance(body, dict) else "", answer)
        assert set(answer["error"]) >= {"message", "type"}
    for t in threads:
        t.join(60)
    assert len(done) == 3 and set(done) <= {"stop", "length"}  # every valid stream ran to its end
    assert urllib.request.urlopen(f"{url}/health").status == 200


def test_api_key_queue_limit_and_drain_on_sigterm(tiny_llama):
    with server(str(tiny_llama), "--api_key", "s3cret", "--max_batch_size", "1", "--max_queue", "1") as (url, proc):
        anonymous = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            anonymous.models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        base = client.models.list().data[0].id
        statuses: list[int] = []

        def ask() -> None:
            status, _ = post(url, "/v1/completions", {"model": base, "prompt": "the film", "max_tokens": 200,
                                                      "temperature": 0}, key="s3cret")
            statuses.append(status)

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert 429 in statuses and 200 in statuses  # one decoding, one waiting, the rest told to retry
        stream = client.completions.create(model=base, prompt="the film", max_tokens=120, temperature=0,
                                           stream=True)
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)  # in flight: finishes; then the server exits 0
        time.sleep(0.3)
        try:
            ready = urllib.request.urlopen(f"{url}/health", timeout=5).status
        except urllib.error.HTTPError as err:
            ready = err.code
        except OSError:  # already closed to new connections
            ready = None
        assert ready != 200  # draining: not ready for new work
        rest = list(stream)
        assert first.choices[0].text is not None and rest[-1].choices[0].finish_reason in ("stop", "length")
        assert proc.wait(60) == 0
