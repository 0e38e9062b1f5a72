"""Decode speed, time to first token, peak memory, size on disk and SST-2 accuracy, PyTorch vs ONNX vs llama.cpp.

Exports the adapter with `slmops auto-opt` (fp32, int8, int4, adapter merged; fp32 and int4 also through
the torch.onnx fallback exporter) and `slmops generate-adapter` (fp32 and int4, adapter as inputs) into --work, then measures each system in its own process (so peak
RSS is that system's alone). Accuracy: label-word next-token scores after the SST-2 prompt, the same
scorer as benchmarks/sst2_accuracy.py, through each runtime.

    python benchmarks/inference.py --adapter runs/sst2-lora --data ../shared/data/sst2/dev.jsonl \
        --gguf /path/to/SmolLM2-135M-Instruct.Q4_1.gguf --work runs/inference
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from sst2_accuracy import PROMPT as SST2, accuracy, label_ids, predicted  # the independent scorer: plain transformers

PROMPT = "<|im_start|>user\nWrite a long story about a dragon who learns to cook.<|im_end|>\n<|im_start|>assistant\n"
ONNX = {  # system -> (command, precision, extra flags)
    "onnx fp32 merged": ("auto-opt", "fp32", []),
    "onnx int8 merged": ("auto-opt", "int8", []),
    "onnx int4 merged": ("auto-opt", "int4", []),  # the default: AutoRound on the run's own rows
    "onnx int4 rtn merged": ("quantize", "int4", ["--algorithm", "rtn"]),
    "onnx int4 k_quant merged": ("quantize", "int4", ["--algorithm", "k_quant"]),
    "onnx int4 k_quant block16 merged": ("quantize", "int4", ["--algorithm", "k_quant", "--block_size", "16"]),
    "onnx int4 k_quant int8-mixed merged": ("quantize", "int4", ["--algorithm", "k_quant", "--int8_layers",
                                                                 "last_matmul,mixed_layers"]),
    "onnx fp32 multi-adapter": ("generate-adapter", "fp32", []),
    "onnx int4 multi-adapter": ("generate-adapter", "int4", []),
    # the fallback exporter for architectures the builder lacks, here forced on one it knows
    "onnx fp32 torch.onnx": ("auto-opt", "fp32", ["--exporter", "torch"]),
    "onnx int4 torch.onnx": ("auto-opt", "int4", ["--exporter", "torch"]),
}


def export(args: argparse.Namespace, system: str) -> Path:
    command, precision, extra = ONNX[system]
    out = Path(args.work) / system.replace(" ", "-")
    if not (out / "genai_config.json").exists():
        flags = (["-m", args.adapter] if command in ("auto-opt", "quantize") else
                 ["--base_model_path", args.base, "--adapter_paths", args.adapter, "--adapter_names", "sst2"])
        subprocess.run([sys.executable, "-m", "slmops", command, *flags, "--precision", precision, *extra,
                        "-o", str(out), "--overwrite"], check=True)
    return out


def folder_mb(*paths: Path) -> float:
    return round(sum(f.stat().st_size for p in paths for f in (p.rglob("*") if p.is_dir() else [p])
                     if f.is_file() and f.suffix not in (".log",)) / 2**20, 1)


def run_one(args: argparse.Namespace) -> dict:
    """Inside the child process: load one system, time a decode, score SST-2."""
    from transformers import AutoTokenizer

    system = args.one
    tok = AutoTokenizer.from_pretrained(args.base)
    rows = [json.loads(line) for line in open(args.data, encoding="utf-8")][: args.limit] if args.data else []
    started = time.perf_counter()
    if system.startswith("pytorch"):
        stream, score, size = _torch(args, system, tok)
    elif system.startswith("onnx"):
        stream, score, size = _onnx(args, system)
    else:
        stream, score, size = _llama_cpp(args)
    load_s = time.perf_counter() - started
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    stream(ids, 4)  # warm-up
    times = stream(ids, args.new_tokens)
    n = len(times) - 1
    result = {"system": system, "load_s": round(load_s, 2), "ttft_ms": round(1000 * times[0], 1),
              "decode_tok_s": round(n / (times[-1] - times[0]), 1) if n > 0 else None, "new_tokens": len(times),
              "size_mb": size}
    if rows and score is not None:
        start = time.perf_counter()
        result.update(accuracy=round(100 * score(tok, rows), 2), rows=len(rows),
                      score_s=round(time.perf_counter() - start, 1))
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def _torch(args, system, tok):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    dtype = torch.bfloat16 if "bf16" in system else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype)
    model = PeftModel.from_pretrained(model, str(Path(args.adapter) / "adapter")).merge_and_unload().eval()

    class Clock(BaseStreamer):
        def __init__(self):
            self.start, self.times, self.prompt_seen = time.perf_counter(), [], False

        def put(self, value):
            if self.prompt_seen:
                self.times.append(time.perf_counter() - self.start)
            self.prompt_seen = True

        def end(self):
            pass

    @torch.no_grad()
    def stream(ids, n):
        clock = Clock()
        model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock,
                       pad_token_id=tok.eos_token_id)
        return clock.times

    base = Path(args.base)
    size = folder_mb(*base.glob("*.safetensors")) * (0.5 if "bf16" in system else 1)
    return stream, lambda tok, rows: accuracy(tok, model, rows), size


def _onnx(args, system):
    from slmops.models.genai import GenaiModel

    folder = Path(args.work) / system.replace(" ", "-")
    model = GenaiModel(folder)
    adapter = "sst2" if "multi" in system else None

    def stream(ids, n):
        start, times = time.perf_counter(), []
        generator = model.generator(len(ids) + n, adapter, min_length=len(ids) + n)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
            times.append(time.perf_counter() - start)
        return times

    def score(tok, rows):
        labels = label_ids(tok)
        correct = 0
        for r in rows:
            last = model.logits(tok(SST2.format(**r))["input_ids"], adapter)[-1]
            correct += predicted(last, labels) == r["tone"]
        return correct / len(rows)

    return stream, score, folder_mb(folder)


def quantize_seconds(args: argparse.Namespace, system: str) -> float | None:
    """The export's own time (quantization included), from its manifest."""
    manifest = Path(args.work) / system.replace(" ", "-") / "manifest.json"
    return json.loads(manifest.read_text())["results"].get("export_seconds") if manifest.is_file() else None


def _llama_cpp(args):
    import llama_cpp
    from llama_cpp import Llama

    if args.no_repack:  # llama.cpp's repacked weight buffers (AMX here) crashed llama-cpp-python 0.3.36
        defaults = llama_cpp.llama_model_default_params

        def plain_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama.llama_cpp.llama_model_default_params = plain_buffers
    llm = Llama(model_path=args.gguf, n_ctx=1024, n_threads=args.threads, verbose=False)

    def stream(ids, n):
        llm.reset()  # else generate() reuses the warm-up's evaluated prompt and times one token, not the prefill
        start, times = time.perf_counter(), []
        for token in llm.generate(ids, temp=0.0, reset=True):
            times.append(time.perf_counter() - start)
            if len(times) >= n:
                break
        return times

    return stream, None, folder_mb(Path(args.gguf))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, help="a `slmops finetune` output folder (LoRA)")
    ap.add_argument("--base", default=str(Path("~/.cache/slmops/models/smollm2-135m-instruct").expanduser()))
    ap.add_argument("--data", help="SST-2 JSONL rows (phrase, tone) for accuracy")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--gguf", help="GGUF file of the base model for llama.cpp (llama-cpp-python)")
    ap.add_argument("--no_repack", action="store_true",
                    help="llama.cpp without repacked weight buffers (its AMX path segfaulted on an AMX Xeon)")
    ap.add_argument("--work", default="runs/inference")
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--systems", default="pytorch fp32,pytorch bf16," + ",".join(ONNX) + ",llama.cpp")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    systems = [s for s in args.systems.split(",") if s != "llama.cpp" or args.gguf]
    for system in systems:
        if system in ONNX:
            export(args, system)
    results = []
    for system in systems:
        argv = [sys.executable, __file__, *sys.argv[1:], "--one", system]
        if system == "pytorch bf16":  # bf16 without AVX-512-BF16 is emulated: a short decode is enough
            argv += ["--new_tokens", "16", "--limit", "0"]
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode:
            print(f"{system}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append({**json.loads(out.stdout.strip().splitlines()[-1]),
                        "quantize_s": quantize_seconds(args, system) if system in ONNX else None})
        print(json.dumps(results[-1]), file=sys.stderr)
    _table(results)


def _table(results: list[dict]) -> None:
    ref = next((r for r in results if r["system"] == "pytorch fp32"), None)
    print("| system | decode tok/s | vs PyTorch fp32 | time to first token | peak RSS | size on disk | SST-2 dev acc "
          "| export s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        speed = f"{r['decode_tok_s'] / ref['decode_tok_s']:.1f}x" if ref and r.get("decode_tok_s") else "-"
        acc = f"{r['accuracy']:.2f}% ({r['rows']})" if "accuracy" in r else "-"
        print(f"| {r['system']} | {r['decode_tok_s']} | {speed} | {r['ttft_ms']:.0f} ms | {r['peak_rss_mb']:.0f} MB "
              f"| {r['size_mb']:.0f} MB | {acc} | {r['quantize_s'] if r.get('quantize_s') is not None else '-'} |")


if __name__ == "__main__":
    main()
