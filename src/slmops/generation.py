"""`slmops generate`: try a model, with or without its adapter, token by token."""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import TextStreamer

from slmops.errors import UsageError
from slmops.models.adapters import adapter_dir, attach_adapter, base_model_of
from slmops.models.catalog import resolve
from slmops.models.genai import GenaiModel, is_genai_folder
from slmops.models.loading import load_model
from slmops.models.tokenizers import load_tokenizer, tokenizer_folder
from slmops.options.generate_options import GenerateOptions


class _Stream(TextStreamer):
    def __init__(self, tokenizer, sink: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.sink = sink

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.sink(text)


def generate(opts: GenerateOptions, on_text: Callable[[str], None] | None = None) -> str:
    """Return the model's continuation of the prompt; `on_text` receives it piece by piece.

    `model_name_or_path` may be an ONNX Runtime GenAI folder; `adapter` then names one of its
    adapters (`slmops generate-adapter`). Same prompt handling and decoding options for both.
    """
    model_name_or_path, adapter_path, adapter = opts.model_name_or_path, opts.adapter_path, opts.adapter
    prompt, chat, seed = opts.prompt, opts.chat, opts.seed
    if model_name_or_path and is_genai_folder(model_name_or_path):
        if adapter_path:
            raise UsageError("--adapter_path is for PyTorch models; an ONNX folder's adapters are chosen by name "
                             "with --adapter NAME")
        return _generate_onnx(prompt, model_name_or_path, opts, on_text)
    if adapter:
        raise UsageError(f"--adapter {adapter}: names an adapter inside an ONNX multi-adapter folder, but "
                         f"{model_name_or_path} is not an ONNX Runtime GenAI folder (no genai_config.json); "
                         f"for a PyTorch model pass --adapter_path")
    adapter_folder = adapter_dir(adapter_path) if adapter_path else None
    if model_name_or_path is None:
        model_name_or_path = base_model_of(adapter_folder)
    trust_remote_code, do_sample = opts.trust_remote_code, opts.do_sample
    path = resolve(model_name_or_path)
    tokenizer = load_tokenizer(tokenizer_folder(adapter_folder, path), trust_remote_code)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = load_model(path, dtype, trust_remote_code, device_map="cuda" if torch.cuda.is_available() else None)
    if adapter_folder is not None:
        model = attach_adapter(model, adapter_folder, model_name_or_path)
    model.eval()
    inputs = _encode(tokenizer, prompt, chat, "pt").to(model.device)
    torch.manual_seed(seed)
    streamer = _Stream(tokenizer, on_text) if on_text else None
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=opts.max_new_tokens, do_sample=do_sample,
                             temperature=opts.temperature if do_sample else None,
                             top_p=opts.top_p if do_sample else None,
                             streamer=streamer, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _encode(tokenizer: Any, prompt: str, chat: bool, tensors: str | None) -> Any:
    if chat:
        if not tokenizer.chat_template:
            raise UsageError("--chat: this tokenizer has no chat template; drop --chat")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors=tensors, return_dict=True)
    return tokenizer(prompt, return_tensors=tensors)


def _generate_onnx(prompt: str, folder: str, opts: GenerateOptions, on_text: Callable[[str], None] | None) -> str:
    model = GenaiModel(folder)
    tokenizer = load_tokenizer(folder)  # the folder's Hugging Face tokenizer files: same ids as PyTorch
    ids = list(_encode(tokenizer, prompt, opts.chat, None)["input_ids"])
    new: list[int] = []
    shown = ""

    def stream(token: int) -> None:
        nonlocal shown
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if on_text is not None and not text.endswith("\ufffd"):  # wait for a split character's other bytes
            on_text(text[len(shown):])
            shown = text

    model.generate(ids, opts.max_new_tokens, opts.adapter, stream, opts.do_sample, opts.temperature, opts.top_p,
                   opts.seed)
    text = tokenizer.decode(new, skip_special_tokens=True)
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown):])
    return text
