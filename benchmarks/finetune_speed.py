"""LoRA fine-tuning speed on this machine: slmops, the plain Trainer + peft recipe and Olive, side by side.

Every system trains SmolLM2-135M-Instruct on the same SST-2 rows with the same recipe (LoRA r16/alpha
32/dropout 0.05 on all linear layers, loss on the answer only, batch 16, lr 2e-4 cosine, one epoch), each
in the same precision (`--precision`; by default bf16 where the CPU has native bf16 matmuls, as the issue's
recipe and Olive's default, else fp32: plain runs bf16 autocast, Olive its bf16 base, slmops its default
bf16 base under autocast), each in its own process, in alternating order over `--repeats`; repeat k
seeds every system with `--seed` + k, so that the repeats show how far loss and accuracy move with the
seed (the adapter's initialisation, data order and dropout), the yardstick for "equal". One
scorer (benchmarks/sst2_accuracy.py, plain transformers + peft) then measures every adapter: validation
loss on the rows after the training rows and accuracy on dev.jsonl.

    python benchmarks/finetune_speed.py --olive-python /work/olive-venv/bin/python [--scale] [--profile]

Columns: train time (each system's own trainer clock), non-padding tokens/s (the rows' real tokens over
that time: the same numerator for everyone), peak RSS of the process tree, validation loss, dev accuracy,
and MFU: the FLOPs the loss needs (4 x frozen linear weights + 6 x LoRA weights per token, attention at
each token's context, the vocabulary head only at supervised positions) over time and over the matmul
peak of the run's precision at the model's own shapes (step_timing.model_peak), measured here at start. `--scale` and `--profile` add slmops's step alone
(benchmarks/step_timing.py, which runs them by themselves): its time at 128/512/2048 tokens a row for
a 135M and a 360M model, and where it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
import sst2_accuracy as scorer  # noqa: E402
from step_timing import RECIPE, flops_per_row, profile_section, scale_section  # noqa: E402
from step_timing import model_peak, peaks as measure_peaks, resolve_model_and_precision  # noqa: E402
from tables import markdown  # noqa: E402

HERE = Path(__file__).resolve().parent
TEMPLATE = scorer.PROMPT + scorer.ANSWER


def run_tree(cmd: list[str], cwd: Path, log: Path) -> tuple[str, float, float]:
    """Run a command; return its output, wall seconds and peak RSS (MB) of its process tree."""
    start, peak = time.perf_counter(), 0
    env = {**os.environ, "OLIVE_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.2)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} ... failed ({proc.returncode}); last lines of {log}:\n{text[-3000:]}")
    return text, time.perf_counter() - start, peak / 2**20


# Each runner takes the arguments, an output folder and a seed, and returns the command, a parser of its
# output -> (train seconds, adapter folder), and a cwd.
def run_slmops(a, out: Path, seed: int, extra: tuple[str, ...] = ()):
    cmd = [sys.executable, "-m", "slmops", "finetune", "--model_name_or_path", a.model, "--data_name", a.data,
           "--train_split", f"train[:{a.rows}]", "--eval_split", f"train[{a.rows}:{a.rows + a.val_rows}]",
           "--text_template", TEMPLATE, "--method", "lora", "--lora_r", str(RECIPE["r"]),
           "--lora_alpha", str(RECIPE["alpha"]), "--lora_dropout", str(RECIPE["dropout"]),
           "--per_device_train_batch_size", str(RECIPE["batch"]), "--learning_rate", str(RECIPE["lr"]),
           "--lr_scheduler_type", "cosine", "--num_train_epochs", "1", "--seed", str(seed), "--output_path", str(out),
           "--torch_dtype", a.precision, "--overwrite", *extra]

    def result(text: str):  # the trainer's clock less the evaluations slmops runs inside it (the others run none)
        r = json.loads((out / "manifest.json").read_text())["results"]
        return r["train_runtime_s"] - r["eval_seconds_in_training"], out / "adapter"
    return cmd, result, Path.cwd()


def run_plain(a, out: Path, seed: int):
    cmd = [sys.executable, str(HERE / "plain_recipe.py"), "--model", a.model, "--data", a.data,
           "--rows", str(a.rows), "--seed", str(seed), "--out", str(out),
           *(["--bf16"] if a.precision == "bfloat16" else [])]
    return cmd, lambda text: (json.loads(text.strip().splitlines()[-1])["train_runtime_s"], out / "adapter"), Path.cwd()


OLIVE_SCRIPT = '''"""Olive user script: one row per example, loss on the answer only (as the other recipes)."""
from olive.data.component.dataset import ClassificationDataset
from olive.data.registry import Registry


@Registry.register_pre_process()
def answer_only(dataset, model_name, prompt_template, answer_template, max_samples=None, **kwargs):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_name)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for row in dataset.select(range(min(max_samples or len(dataset), len(dataset)))):
        prompt = tok(prompt_template.format(**row), add_special_tokens=False)["input_ids"]
        answer = tok(answer_template.format(**row), add_special_tokens=False)["input_ids"]
        ids = torch.tensor(prompt + answer)
        out["input_ids"].append(ids)
        out["attention_mask"].append(torch.ones_like(ids))
        out["labels"].append(torch.tensor([-100] * len(prompt) + answer))
    data = Dataset.from_dict(out)
    data.set_format("torch", output_all_columns=True)
    return ClassificationDataset(data, "labels", max_samples=max_samples)
'''


def run_olive(a, out: Path, seed: int):
    """`olive run` with the LoRA pass configured like the other recipes (the `olive finetune` CLI can
    neither put the loss on the answer only nor keep one row per example)."""
    work = Path(tempfile.mkdtemp(prefix="olive-"))  # Olive caches in its working folder: always fresh
    (work / "answer_only.py").write_text(OLIVE_SCRIPT)
    config = {
        "input_model": {"type": "HfModel", "model_path": a.model, "load_kwargs": {"attn_implementation": "sdpa"}},
        "data_configs": [{
            "name": "train", "type": "HuggingfaceContainer", "user_script": str(work / "answer_only.py"),
            "load_dataset_config": {"data_name": "json", "data_files": [a.data], "split": f"train[:{a.rows}]"},
            "pre_process_data_config": {"type": "answer_only", "prompt_template": scorer.PROMPT,
                                        "answer_template": scorer.ANSWER, "max_samples": a.rows},
            "dataloader_config": {"batch_size": 1}}],
        "passes": {"lora": {
            "type": "LoRA", "train_data_config": "train", "torch_dtype": a.precision, "r": RECIPE["r"],
            "alpha": RECIPE["alpha"], "lora_dropout": RECIPE["dropout"],
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "training_args": {"per_device_train_batch_size": RECIPE["batch"], "learning_rate": RECIPE["lr"],
                              "lr_scheduler_type": "cosine", "num_train_epochs": 1, "gradient_checkpointing": False,
                              "logging_steps": 10, "seed": seed, "output_dir": str(work / "trainer")}}},
        "output_dir": str(out), "no_artifacts": True, "log_severity_level": 1,
    }
    (work / "config.json").write_text(json.dumps(config, indent=1))
    cmd = [a.olive_python, "-m", "olive", "run", "--config", str(work / "config.json")]

    def result(text: str):
        runtime = re.findall(r"'train_runtime': '?([0-9.]+)", text)
        if not runtime:
            raise SystemExit("olive: no train_runtime in its output")
        return float(runtime[-1]), out / "adapter"
    return cmd, result, work


RUNNERS = {"slmops": run_slmops, "plain": run_plain, "olive": run_olive,
           # slmops computing the batch's shared prefix once (by default only without dropout; the recipe has it)
           "slmops-shared": lambda a, out, seed: run_slmops(a, out, seed, ("--share_prefix", "true"))}


MEASURES = ("tokens_per_s", "peak_rss_gb", "val_loss", "dev_acc", "mfu")


def measured(r: dict, ref: dict) -> dict:
    """The table's columns for one result, its ratios against `ref` (slmops's)."""
    return {"non-pad tokens/s": f"{r['tokens_per_s']:.1f}",
            "slmops speed-up": f"{ref['tokens_per_s'] / r['tokens_per_s']:.2f}x",
            "peak RSS": f"{r['peak_rss_gb']:.2f} GB",
            "RSS vs slmops": f"{r['peak_rss_gb'] / ref['peak_rss_gb']:.2f}x",
            "val loss": f"{r['val_loss']:.4f}", "dev acc": f"{100 * r['dev_acc']:.2f}%",
            "MFU": f"{100 * r['mfu']:.0f}%"}


def medians(results: list[dict]) -> list[dict]:
    """Per system, the median of each measure over its repeats, against slmops's medians."""
    by_system: dict[str, list[dict]] = {}
    for r in results:
        by_system.setdefault(r["system"], []).append(r)
    middle = {system: {m: statistics.median(r[m] for r in runs) for m in MEASURES}
              for system, runs in by_system.items()}
    return [{"system": system, "runs": len(by_system[system]), **measured(m, middle["slmops"])}
            for system, m in middle.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Hugging Face folder (default: slmops's smollm2-135m-instruct)")
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared/data/sst2/train.jsonl"))
    ap.add_argument("--dev", default=str(HERE.parent.parent / "shared/data/sst2/dev.jsonl"))
    ap.add_argument("--rows", type=int, default=2000, help="training rows (default 2000)")
    ap.add_argument("--val-rows", dest="val_rows", type=int, default=200,
                    help="rows after the training rows, for the validation loss (default 200)")
    ap.add_argument("--systems", default="plain,slmops,olive", help=f"some of {', '.join(RUNNERS)}")
    ap.add_argument("--olive-python", dest="olive_python", help="python of a virtualenv with olive-ai[finetune]")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42, help="the first repeat's seed; repeat k uses seed + k (default 42)")
    ap.add_argument("--out", default="runs/speed")
    ap.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="every system's precision (default: bfloat16 on a CPU with native bf16, else float32)")
    ap.add_argument("--scale", action="store_true", help="also time steps at 128/512/2048 tokens, 135M and 360M")
    ap.add_argument("--profile", action="store_true",
                    help="also profile slmops's step: 16 and 64 rows, fixed and per-token parts, operators by kind")
    a = ap.parse_args()
    a.model, a.precision = resolve_model_and_precision(a.model, a.precision)
    systems = [s for s in a.systems.split(",") if s != "olive" or a.olive_python]
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    peaks = measure_peaks()
    peak = model_peak(a.model, a.precision)
    print(f"square matmul peak here: fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.1f} GFLOP/s; "
          f"{a.precision} at the model's own shapes {peak:.0f} GFLOP/s; every system runs {a.precision}", flush=True)
    train_rows = scorer.read_rows(a.data, 0, a.rows)
    tokens, flops = flops_per_row(a.model, train_rows)
    val_rows = scorer.read_rows(a.data, a.rows, a.rows + a.val_rows)
    dev_rows = scorer.read_rows(a.dev)

    results = []
    for rep in range(a.repeats):
        for system in systems if rep % 2 == 0 else systems[::-1]:
            folder = out / f"{system}-{rep}"
            cmd, parse, cwd = RUNNERS[system](a, folder, a.seed + rep)
            print(f"[{system} {rep + 1}/{a.repeats}] {' '.join(cmd[:4])} ...", flush=True)
            text, wall, rss = run_tree(cmd, cwd, out / f"{system}-{rep}.log")
            runtime, adapter = parse(text)
            tok, model = scorer.load(a.model, str(adapter))
            results.append({"system": system, "repeat": rep, "seed": a.seed + rep, "train_s": round(runtime, 1),
                            "wall_s": round(wall, 1),
                            "tokens_per_s": sum(tokens) / runtime, "peak_rss_gb": rss / 1024,
                            "val_loss": scorer.answer_loss(tok, model, val_rows),
                            "dev_acc": scorer.accuracy(tok, model, dev_rows),
                            "mfu": sum(flops) / runtime / 1e9 / peak})
            print(results[-1], flush=True)

    ours = {r["repeat"]: r for r in results if r["system"] == "slmops"}
    table = []
    for r in results:
        ref = ours.get(r["repeat"], r)  # each repeat against slmops's run in the same repeat
        table.append({"system": r["system"], "repeat": r["repeat"] + 1, "seed": r["seed"],
                      "train time": f"{r['train_s']:.0f} s", "wall": f"{r['wall_s']:.0f} s", **measured(r, ref)})
    print(f"\n{a.rows} rows, {sum(tokens)} real tokens, {sum(flops) / 1e12:.1f} TFLOP of loss-relevant work; "
          f"square matmul peak fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.1f} GFLOP/s; "
          f"{a.precision}, MFU against its peak at the model's own shapes, {peak:.0f} GFLOP/s\n")
    print(markdown(table))
    if a.repeats > 1 and ours:
        print("\nMedians over the repeats (the machine's drift moves single runs by up to ~10%):\n")
        print(markdown(medians(results)))
    report = {"peaks_gflops": peaks, "model_peak_gflops": peak, "precision": a.precision, "rows": a.rows, "tokens": sum(tokens),
              "results": results}
    if a.scale:
        report["scale"] = scale_section(a.model, a.precision)
        print("\n" + markdown(report["scale"]))
    if a.profile:
        report["profile"] = profile_section(a.model, a.precision, peak, a.data)
        for title, rows in report["profile"].items():
            print(f"\n{title}:\n{markdown(rows)}")
    (out / "results.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
