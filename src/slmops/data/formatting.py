"""Rows -> text -> token ids with labels that cover only the response.

Each formatter returns the text plus the character spans the loss should cover; one
tokenizer pass with offset mapping then turns spans into labels. Working in characters,
not in separately tokenized prompt/response pieces, keeps the mask right when a token
straddles the prompt/response boundary (BPE merges across it).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from slmops.errors import UsageError

IGNORE = -100
Span = tuple[int, int]
Formatter = Callable[[dict], tuple[str, list[Span]]]

_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r"}


def unescape(template: str) -> str:
    r"""Read a shell-typed `\n` as a newline, as Olive's documented templates intend."""
    for seq, char in _ESCAPES.items():
        template = template.replace(seq, char)
    return template


@dataclass(frozen=True)
class Template:
    """A `{field}` template; the last placeholder and what follows it is the response."""

    text: str
    fields: tuple[str, ...]
    prompt_part: str

    @classmethod
    def parse(cls, template: str) -> Template:
        template = unescape(template)
        try:
            pieces = list(string.Formatter().parse(template))
        except ValueError as err:
            raise UsageError(f"--text_template is not a valid template ({err}); write placeholders as "
                             f"{{field}} and literal braces as {{{{ and }}}}") from None
        fields = tuple(f for _, f, _, _ in pieces if f is not None)
        if not fields:
            raise UsageError("--text_template has no {field} placeholders; name the data's columns, "
                             "e.g. 'Review: {phrase}\\nTone: {tone}'")
        if any(not f.isidentifier() for f in fields):
            bad = next(f for f in fields if not f.isidentifier())
            raise UsageError(f"--text_template placeholder {{{bad}}} is not a plain column name")
        last = max(i for i, (_, f, _, _) in enumerate(pieces) if f is not None)
        prompt = "".join(_rebuild(p) for p in pieces[:last]) + _escape(pieces[last][0])
        return cls(template, fields, prompt)

    @property
    def response_field(self) -> str:
        return self.fields[-1]

    def check_columns(self, columns: Sequence[str]) -> None:
        missing = [f for f in dict.fromkeys(self.fields) if f not in columns]
        if missing:
            raise UsageError(f"template field(s) {', '.join(missing)} not in the data; fields present: "
                             f"{', '.join(columns)}; fix --text_template")

    def __call__(self, row: dict) -> tuple[str, list[Span]]:
        text = self.text.format_map(row)
        return text, [(len(self.prompt_part.format_map(row)), len(text))]


def text_field_formatter(field: str) -> Formatter:
    """Plain text: no prompt to mask, the whole text is learned."""
    def fmt(row: dict) -> tuple[str, list[Span]]:
        text = row[field]
        return text, [(0, len(text))]
    return fmt


def chat_formatter(tokenizer: Any, field: str) -> Formatter:
    """Render a message list with the tokenizer's chat template; learn the assistant turns.

    A turn's span is found by rendering the conversation up to it with and without the
    generation prompt, which works for any template that renders conversations as prefixes.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("--use_chat_template: this model's tokenizer has no chat template; "
                         "use --text_template instead")

    def render(messages: list, gen: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def fmt(row: dict) -> tuple[str, list[Span]]:
        messages = row[field]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise UsageError(f"--use_chat_template: column {field!r} must hold a list of "
                             f'{{"role": ..., "content": ...}} messages, got {str(messages)[:80]}')
        full = render(messages)
        text = full.rstrip()  # so a turn-closing EOS is the last token and no second one is appended
        spans = []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            upto = render(messages[: i + 1])
            start, end = len(render(messages[:i], gen=True)), len(upto)
            if not full.startswith(upto):  # template is not prefix-stable
                start = text.find(str(msg.get("content", "")), spans[-1][1] if spans else 0)
                end = start + len(str(msg.get("content", "")))
            # learn the turn and its end-of-turn token, not the template's whitespace after it
            spans.append((start, max(start, len(text[:end].rstrip()))))
        return text, spans
    return fmt


@dataclass
class Tokenized:
    input_ids: list[list[int]]
    labels: list[list[int]]
    truncated: int
    dropped: int  # rows left with nothing to learn, of which:
    no_response: int  # ... had none before truncation (e.g. a conversation without an assistant turn)


def tokenize(texts: list[str], spans: list[list[Span]], tokenizer: Any, max_len: int,
             train_on_prompt: bool, add_eos: bool, add_special_tokens: bool = True,
             batch_size: int = 1000) -> Tokenized:
    """Token ids plus labels; rows whose response is cut away entirely are dropped and counted."""
    eos = tokenizer.eos_token_id if add_eos else None
    out = Tokenized([], [], 0, 0, 0)
    for lo in range(0, len(texts), batch_size):
        enc = tokenizer(texts[lo: lo + batch_size], return_offsets_mapping=True,
                        add_special_tokens=add_special_tokens)
        for ids, offsets, row_spans in zip(enc["input_ids"], enc["offset_mapping"], spans[lo: lo + batch_size]):
            labels = [tid if train_on_prompt or _inside(off, row_spans) else IGNORE
                      for tid, off in zip(ids, offsets)]
            if eos is not None and (not ids or ids[-1] != eos):
                ids, labels = ids + [eos], labels + [eos]
            no_response = all(lab == IGNORE for lab in labels[1:])
            cut_away = False
            if len(ids) > max_len:
                out.truncated += 1
                ids, labels = ids[:max_len], labels[:max_len]
                cut_away = not no_response and all(lab == IGNORE for lab in labels[1:])
            if no_response or cut_away:
                out.dropped += 1
                out.no_response += no_response
                continue
            out.input_ids.append(ids)
            out.labels.append(labels)
    return out


def _inside(offset: Sequence[int], spans: list[Span]) -> bool:
    start, end = offset
    return end > start and any(end > s and start < e for s, e in spans)


def _escape(literal: str) -> str:
    return literal.replace("{", "{{").replace("}", "}}")


def _rebuild(piece: tuple) -> str:
    literal, field, spec, conv = piece
    out = _escape(literal)
    if field is not None:
        out += "{" + field + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
    return out
