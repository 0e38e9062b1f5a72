"""Tiny random models and small data sets built inside the tests: seconds, no download."""

from __future__ import annotations

import os

# The tests never reach a hub: fail fast on hub ids instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import random
from pathlib import Path

import pytest  # noqa: E402
import torch  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("good great fine bad awful dull film movie plot actor scene story music funny sad long short "
         "the a is was and but not very quite truly").split()


def _corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200)] + [
        "Review: Tone: positive negative User: Assistant: {}[]:\n\t"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "llama": ("LlamaConfig", DECODER),
    "qwen2": ("Qwen2Config", DECODER),
    "qwen3": ("Qwen3Config", {**DECODER, "head_dim": 16}),
    "phi3": ("Phi3Config", DECODER),
    "gemma": ("GemmaConfig", {**DECODER, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {**DECODER, "head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", {**DECODER, "head_dim": 16}),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
}


def build_model(tokenizer_dir: Path, root: Path, family: str = "llama") -> Path:
    """A 2-layer random model of `family` with the test tokenizer, saved as a HF folder."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = root / f"tiny-{family}"
    if (folder / "config.json").exists():
        return folder
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cls_name, sizes = FAMILIES[family]
    config = getattr(transformers, cls_name)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **sizes)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_llama(tokenizer_dir, models_root) -> Path:
    return build_model(tokenizer_dir, models_root, "llama")


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    good, bad = ["good", "great", "fine", "funny"], ["bad", "awful", "dull", "sad"]
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = [rng.choice(good if positive else bad), rng.choice(WORDS[6:12]), rng.choice(WORDS[18:])]
        rows.append({"phrase": " ".join(words), "tone": "positive" if positive else "negative"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def sentiment_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "sentiment.jsonl", sentiment_rows(48))


TEMPLATE = "Review: {phrase}\\nTone: {tone}"


def make_adapter(base: Path, folder: Path, targets: list[str], r: int, seed: int, **lora) -> Path:
    """A LoRA adapter with random, non-zero B (an untrained adapter would change nothing); `lora`: more of
    peft's LoraConfig."""
    import torch
    from peft import LoraConfig, get_peft_model

    from slmops.models.loading import load_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(str(base), torch.float32),
                           LoraConfig(**{"r": r, "lora_alpha": 2 * r, "target_modules": targets,
                                                   "init_lora_weights": False, **lora}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder
