"""`slmops serve` under load on this machine: throughput and latency at 1, 4 and 16 concurrent clients,
requests spread over three LoRA adapters on one base, against the same server decoding one request at a
time (`--max_batch_size 1`, the naive server). A bounded asyncio client on loopback; greedy decoding,
64 new tokens a request (`ignore_eos`), SST-2 dev sentences as chat prompts.

    python benchmarks/serve_load.py                       # SmolLM2-135M-Instruct, three random adapters
    python benchmarks/serve_load.py --adapters a=runs/x,b=runs/y,c=runs/z --levels 1,4,16

Prints, per server and concurrency: generated tokens/s overall, p50/p99 time to first token, p50/p99 time
per output token, errors, and the server's peak resident memory.

    python benchmarks/serve_load.py --servers slmops --levels 16 --spread one,mixed   # 1 adapter vs 3
    python benchmarks/serve_load.py --servers slmops --soak 600                        # RSS over 10 min, 4 clients

`llamacpp` in --servers adds llama-cpp-python's server on a 4-bit GGUF of the same model, from its own venv
(--llamacpp_python, --gguf): 2 threads, no adapters (every request goes to the base, the table says so), one
request at a time under its lock, 64 tokens forced by a -100 logit bias on the end-of-generation tokens.
Build it with CMAKE_ARGS=-DGGML_OPENMP=OFF: its server calls the model from changing threads, each of which
gets an OpenMP team of its own, and the idle teams' spinning slows decoding ~2.5x from two clients on.
On an Intel CPU with AMX also add -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 to CMAKE_C_FLAGS/CMAKE_CXX_FLAGS
where AMX faults inside a virtual machine (its Q4 models crash at the first AMX instruction).

`onnx` in --servers serves an exported folder (`--onnx`, from `slmops generate-adapter ... --precision int4`
with the adapters named as --adapters) through the ONNX Runtime GenAI back end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import urllib.request

import psutil
from openai import APIError, AsyncOpenAI
from tables import markdown

HERE = Path(__file__).resolve().parent


def random_adapters(model: str, folder: Path, count: int = 3) -> dict[str, str]:
    """LoRA adapters with random weights (r16 on every linear layer): the load is the same as trained ones'."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    found = {}
    for i in range(count):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model)
        peft = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                               init_lora_weights=False, task_type="CAUSAL_LM"))
        peft.save_pretrained(folder / f"adapter{i}")
        found[f"adapter{i}"] = str(folder / f"adapter{i}")
    return found


def prompts(count: int) -> list[str]:
    rows = [json.loads(line) for line in (HERE.parent.parent / "shared/data/sst2/dev.jsonl").read_text().splitlines()]
    return [f"What is the tone of this review? {r.get('sentence') or r.get('phrase')}" for r in rows[:count]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on loopback, polled on `health` until it answers; its resident memory sampled."""

    def __init__(self, command: list[str], port: int, health: str = "/health", **popen):
        self.proc = subprocess.Popen(command, **popen)
        self.url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if urllib.request.urlopen(f"{self.url}{health}", timeout=2).status == 200:
                    break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{command[:3]} exited {self.proc.returncode} before answering")
                time.sleep(0.5)
        self.peak, self._stop = 0, threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        proc = psutil.Process(self.proc.pid)
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, proc.memory_info().rss)

    def close(self) -> None:
        self._stop.set()
        self.proc.terminate()
        self.proc.wait(60)


def slmops_server(model: str, adapters: dict[str, str], batch: int, *more: str) -> Server:
    port, spec = free_port(), ",".join(f"{k}={v}" for k, v in adapters.items())
    return Server([sys.executable, "-m", "slmops", "serve", model, *(["--adapters", spec] if spec else []),
                   "--served_model_name", "base", "--port", str(port), "--max_batch_size", str(batch),
                   "--max_queue", "256", "--log_level", "2", *more], port)


def llamacpp_server(python: str, gguf: str, log: Path) -> Server:
    """`--interrupt_requests false`: by default a request that arrives while another streams ends that stream
    early; its access log goes to `log`, not between the rows."""
    port = free_port()
    try:
        with log.open("w") as out:
            return Server([python, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", "base", "--host",
                           "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2",
                           "--n_threads_batch", "2", "--interrupt_requests", "false", "--verbose", "false"],
                          port, "/v1/models", stdout=out, stderr=subprocess.STDOUT)
    except RuntimeError as err:
        raise RuntimeError(f"{err}; its log ends:\n{log.read_text()[-2000:]}") from None


EOG_IDS = ("import sys, llama_cpp; m = llama_cpp.Llama(sys.argv[1], vocab_only=True, verbose=False); "
           "print(*[t for t in range(m.n_vocab()) if llama_cpp.llama_vocab_is_eog(m._model.vocab, t)])")


def llamacpp_options(python: str, gguf: str) -> dict:
    """Request fields that make llama.cpp decode like `ignore_eos` and greedy: it has no ignore_eos, so every
    end-of-generation token (as llama.cpp itself counts them) gets a -100 logit bias, and its default
    repeat_penalty of 1.1 goes to 1."""
    ids = subprocess.check_output([python, "-c", EOG_IDS, gguf], text=True, stderr=subprocess.DEVNULL).split()
    return {"logit_bias": {i: -100 for i in ids}, "extra_body": {"repeat_penalty": 1.0}}


SLMOPS_OPTIONS = {"stream_options": {"include_usage": True}, "extra_body": {"ignore_eos": True}}


async def one(client: AsyncOpenAI, model: str, prompt: str, tokens: int, options: dict) -> dict:
    """Tokens made: the usage chunk's count; llama.cpp sends none, so `tokens` when it stopped on length,
    else its content chunks (about one a token)."""
    start, first, made, chunks, finish = time.perf_counter(), None, None, 0, None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0, stream=True,
        **options)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first, chunks = first or time.perf_counter(), chunks + 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage:
            made = chunk.usage.completion_tokens
    end = time.perf_counter()
    made = made if made is not None else tokens if finish == "length" else chunks
    return {"ttft": (first or end) - start, "tpot": (end - (first or end)) / max(made - 1, 1), "tokens": made}


async def level(url: str, models: list[str], texts: list[str], clients: int, requests: int, tokens: int,
                options: dict = SLMOPS_OPTIONS) -> dict:
    """`requests` requests over the models in turn, `clients` at a time, each client sending its next when
    its last has ended."""
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait((models[i % len(models)], texts[i % len(texts)]))
    results: list[dict] = []
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

    async def worker() -> None:
        while not queue.empty():
            model, text = queue.get_nowait()
            try:
                results.append(await one(client, model, text, tokens, options))
            except APIError as err:
                results.append({"error": type(err).__name__})

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    ok = [r for r in results if "error" not in r]
    ttft, tpot = sorted(r["ttft"] for r in ok), sorted(r["tpot"] for r in ok)
    return {"clients": clients, "requests": requests, "tokens/s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "TTFT p50 ms": round(1000 * statistics.median(ttft)), "TTFT p99 ms": round(1000 * _p99(ttft)),
            "TPOT p50 ms": round(1000 * statistics.median(tpot), 1), "TPOT p99 ms": round(1000 * _p99(tpot), 1),
            "errors": len(results) - len(ok)}


def soak(server: Server, models: list[str], texts: list[str], seconds: float, tokens: int, options: dict) -> dict:
    """4 clients without pause for `seconds`: resident memory after the first round and at the end."""
    rss = psutil.Process(server.proc.pid)
    asyncio.run(level(server.url, models, texts, 4, 8, tokens, options))
    start, first = time.perf_counter(), rss.memory_info().rss
    rounds = errors = 0
    while time.perf_counter() - start < seconds:
        errors += asyncio.run(level(server.url, models, texts, 4, 8, tokens, options))["errors"]
        rounds += 1
    last = rss.memory_info().rss
    return {"seconds": round(time.perf_counter() - start), "requests": rounds * 8, "errors": errors,
            "RSS after warm-up GB": round(first / 2**30, 3), "RSS at end GB": round(last / 2**30, 3),
            "growth": f"{100 * (last - first) / first:.1f}%"}


def _p99(values: list[float]) -> float:
    return values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]


def start(name: str, a: argparse.Namespace, adapters: dict[str, str], tmp: Path) -> tuple | None:
    """The server `name`, the fields its requests carry, and whether it serves the adapters; None, said why,
    when llama.cpp's venv or GGUF is missing, so the other servers still run."""
    if name == "onnx":
        if not (Path(a.onnx or "") / "genai_config.json").is_file():
            print(f"onnx: skipped, no exported folder at --onnx {a.onnx}", flush=True)
            return None
        return slmops_server(a.onnx, {}, 16), SLMOPS_OPTIONS, True  # its adapters/ are served by name
    if name == "slmops-bf16":
        return slmops_server(a.model, adapters, 16, "--torch_dtype", "bfloat16"), SLMOPS_OPTIONS, True
    if name != "llamacpp":
        return slmops_server(a.model, adapters, 16 if name == "slmops" else 1), SLMOPS_OPTIONS, True
    missing = [p for p in (a.llamacpp_python, a.gguf) if not Path(p).exists()]
    if missing:
        print(f"llamacpp: skipped, no {' and no '.join(missing)} (see --llamacpp_python, --gguf)", flush=True)
        return None
    server = llamacpp_server(a.llamacpp_python, a.gguf, tmp / "llamacpp.log")
    return server, llamacpp_options(a.llamacpp_python, a.gguf), False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the catalogue's smollm2-135m-instruct)")
    ap.add_argument("--adapters", help="NAME=PATH,... (default: three random LoRA adapters)")
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens a request (default 64)")
    ap.add_argument("--requests", type=int, default=2, help="requests a client sends at each level (default 2)")
    ap.add_argument("--servers", default="slmops,naive", help="slmops (batch 16), naive (batch 1), slmops-bf16 "
                                                            "(batch 16, --torch_dtype bfloat16), llamacpp, onnx")
    ap.add_argument("--onnx", help="for onnx: a `slmops generate-adapter` folder whose adapters carry the names "
                                   "of --adapters (adapter0..2 by default), served through ONNX Runtime GenAI")
    ap.add_argument("--spread", default="mixed", help="mixed (requests over every adapter in turn), one (every "
                                                      "request to the first adapter), base (every request to the "
                                                      "base), or several: one,mixed")
    ap.add_argument("--soak", type=float, help="instead: 4 clients for this many seconds; RSS at start and end")
    ap.add_argument("--llamacpp_python", default="/work/llamacpp-venv/bin/python",
                    help="python of a venv with llama-cpp-python[server]")
    ap.add_argument("--gguf", default="/work/llamacpp-models/smollm2-135m-instruct-q4_0.gguf",
                    help="the model as GGUF, for llamacpp")
    a = ap.parse_args()
    names = a.servers.split(",")
    lora = {"slmops", "naive", "slmops-bf16"} & set(names)
    if a.model is None and lora:
        from slmops.models.catalog import resolve
        a.model = resolve("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        adapters = dict(x.split("=", 1) for x in a.adapters.split(",")) if a.adapters else \
            random_adapters(a.model, Path(tmp)) if lora else {f"adapter{i}": "" for i in range(3)}
        levels = [int(x) for x in a.levels.split(",")]
        texts = prompts(64)
        rows = []
        for name in names:
            started = start(name, a, adapters, Path(tmp))
            if started is None:
                continue
            server, options, serves_adapters = started
            try:
                if a.soak:
                    served = list(adapters) if serves_adapters else ["base"]
                    rows.append({"server": name, **soak(server, served, texts, a.soak, a.tokens, options)})
                    print(rows[-1], flush=True)
                for spread in [] if a.soak else a.spread.split(","):
                    models = {"one": list(adapters)[:1], "base": ["base"]}.get(spread, list(adapters))
                    served = models if serves_adapters else ["base"]
                    label = "none" if spread == "base" else len(models) if serves_adapters else \
                        f"base for {len(models)}"
                    for clients in levels:
                        row = asyncio.run(level(server.url, served, texts, clients, clients * a.requests, a.tokens,
                                                options))
                        rows.append({"server": name, "adapters": label, **row})
                        print(rows[-1], flush=True)
            finally:
                server.close()
            for row in rows:
                if row["server"] == name:
                    row["peak RSS GB"] = round(server.peak / 2**30, 2)
    if not rows:
        return
    print("\n" + markdown(rows))


if __name__ == "__main__":
    main()
