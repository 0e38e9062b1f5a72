"""The model behind `slmops evaluate`: a small protocol, so PyTorch and ONNX Runtime GenAI models are
scored by the same code on the same data.

A backend sees strings, never tokens, so each can tokenize the way its runtime does. Each call is
one batch; `evaluate` does the batching, ordering, timing and progress.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import torch
import torch.nn.functional as F

from slmops.data.formatting import IGNORE, tokenize
from slmops.errors import UsageError
from slmops.models.adapters import attach_adapter
from slmops.models.catalog import resolve
from slmops.models.genai import GenaiModel, is_genai_folder
from slmops.models.loading import load_model
from slmops.models.tokenizers import load_tokenizer, tokenizer_folder

NO_LIMIT = 1 << 30  # evaluation scores the whole text: no --max_seq_len truncation


class Score(NamedTuple):
    """A continuation's summed log-probability, the tokens it covers, and whether greedy decoding would have
    produced every one of them (lm-evaluation-harness's `is_greedy`)."""

    logprob: float
    tokens: int
    greedy: bool


class Backend(Protocol):
    """All `evaluate` asks of a model; greedy decoding only, so results are reproducible across runtimes."""

    name: str  # recorded in results.json: "torch", "onnx-genai", ...

    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[Score]:
        """Per pair: the summed log-probability of `continuation` following `prompt`, how many tokens that
        covers, and whether each is the model's top choice. The tokens are those of `prompt + continuation`
        tokenized as one text that overlap the continuation (as `finetune` masks the loss), so a token
        straddling the boundary counts."""
        ...

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuation of each prompt, up to EOS or `max_new_tokens`, without special tokens."""
        ...

    def text_nll(self, texts: Sequence[str]) -> tuple[float, int]:
        """Summed negative log-likelihood of every token after the first, over all texts, and that count."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens in each text, as the model reads it (for throughput)."""
        ...


def load_backend(model_name_or_path: str, adapter: Path | None = None, trust_remote_code: bool = False,
                 onnx_adapter: str | None = None, cuda: bool | None = None) -> Backend:
    """The backend for a model: an ONNX Runtime GenAI folder (with `onnx_adapter` naming one of its
    adapters) or anything transformers loads (with a PEFT `adapter` folder; `cuda` None: where present)."""
    if is_genai_folder(model_name_or_path):
        return OnnxBackend(model_name_or_path, onnx_adapter)
    return TorchBackend.load(model_name_or_path, adapter, trust_remote_code, cuda)


def _continuation_rows(tokenizer: Any, prompts: Sequence[str], continuations: Sequence[str]):
    """Token ids of prompt + continuation as one text, labelled where they overlap the continuation."""
    texts = [p + c for p, c in zip(prompts, continuations, strict=True)]
    spans = [[(len(p), len(t))] for p, t in zip(prompts, texts)]
    tok = tokenize(texts, spans, tokenizer, NO_LIMIT, train_on_prompt=False, add_eos=False)
    if len(tok.input_ids) < len(texts):
        raise UsageError("a continuation starts the text, so nothing before it predicts it; make the "
                         "template put a prompt before the response")
    return tok.input_ids, tok.labels


def _scores(input_ids: list[list[int]], labels: list[list[int]],
            run_logits: Callable[[list[list[int]]], Sequence[torch.Tensor]]) -> list[Score]:
    """Summed log-probability, count and greediness of each row's labelled tokens.

    The model reads a row up to its last token; a row whose input is the start of another's takes its
    logits from that row's pass, so a prompt scored against one-token labels runs once, not per label.
    `run_logits` returns each run's logits ([len(run), vocab]).
    """
    inputs = [row[:-1] for row in input_ids]
    runs: list[list[int]] = []
    source = [0] * len(inputs)
    for i in sorted(range(len(inputs)), key=lambda i: -len(inputs[i])):
        source[i] = next((j for j, run in enumerate(runs) if run[:len(inputs[i])] == inputs[i]), len(runs))
        if source[i] == len(runs):
            runs.append(inputs[i])
    picks = [(i, pos, target) for i, row in enumerate(labels) for pos, target in enumerate(row[1:])
             if target != IGNORE]
    sums, counts, greedy = [0.0] * len(inputs), [0] * len(inputs), [True] * len(inputs)
    if not picks:
        return [Score(*row) for row in zip(sums, counts, greedy)]
    logits = run_logits(runs)
    for i, pos, target in picks:
        row = F.log_softmax(logits[source[i]][pos].float(), -1)
        sums[i] += row[target].item()
        counts[i] += 1
        greedy[i] = greedy[i] and int(row.argmax()) == target
    return [Score(*row) for row in zip(sums, counts, greedy)]


class TorchBackend:
    """A transformers model (plus a PEFT adapter), in eval mode and without gradients."""

    name = "torch"

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, model_name_or_path: str, adapter: Path | None = None, trust_remote_code: bool = False,
             cuda: bool | None = None) -> TorchBackend:
        path = resolve(model_name_or_path)
        tokenizer = load_tokenizer(tokenizer_folder(adapter, path), trust_remote_code)
        cuda = torch.cuda.is_available() if cuda is None else cuda
        model = load_model(path, torch.bfloat16 if cuda else torch.float32, trust_remote_code,
                           device_map="cuda" if cuda else None)
        if adapter is not None:
            model = attach_adapter(model, adapter, model_name_or_path)
        return cls(model, tokenizer)

    @torch.no_grad()
    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[Score]:
        return _scores(*_continuation_rows(self.tokenizer, prompts, continuations), self._run_logits)

    @torch.no_grad()
    def text_nll(self, texts: Sequence[str]) -> tuple[float, int]:
        ids = self.tokenizer(list(texts))["input_ids"]
        scores = _scores(ids, ids, self._run_logits)
        return -sum(s.logprob for s in scores), sum(s.tokens for s in scores)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        # left padding: every prompt must end where generation starts
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(self.device)
        out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                  top_p=None, top_k=None, pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts))["input_ids"]]

    def _run_logits(self, runs: list[list[int]]) -> torch.Tensor:
        """One padded batch; right padding leaves each run's own positions untouched (causal)."""
        width = max(map(len, runs))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([run + [pad] * (width - len(run)) for run in runs], device=self.device)
        mask = torch.tensor([[1] * len(run) + [0] * (width - len(run)) for run in runs], device=self.device)
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits


class OnnxBackend:
    """An ONNX Runtime GenAI folder (`slmops auto-opt` / `generate-adapter`), optionally one named adapter.

    Text goes through the folder's Hugging Face tokenizer, so ids match the PyTorch backend's exactly.
    """

    name = "onnx-genai"

    def __init__(self, folder: str, adapter: str | None = None):
        self.model = GenaiModel(folder)
        self.tokenizer = load_tokenizer(str(Path(folder).expanduser()))
        if adapter is not None:
            self.model.check_adapter(adapter)
        self.adapter = adapter

    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[Score]:
        return _scores(*_continuation_rows(self.tokenizer, prompts, continuations), self._run_logits)

    def text_nll(self, texts: Sequence[str]) -> tuple[float, int]:
        ids = self.tokenizer(list(texts))["input_ids"]
        scores = _scores(ids, ids, self._run_logits)
        return -sum(s.logprob for s in scores), sum(s.tokens for s in scores)

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        ids = self.tokenizer(list(prompts))["input_ids"]
        return [self.tokenizer.decode(self.model.generate(row, max_new_tokens, self.adapter), skip_special_tokens=True)
                for row in ids]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts))["input_ids"]]

    def _run_logits(self, runs: list[list[int]]) -> list[torch.Tensor]:
        return [torch.from_numpy(self.model.logits(run, self.adapter)) for run in runs]
