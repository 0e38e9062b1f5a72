from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from slmops.data.formatting import IGNORE, Template, chat_formatter, text_field_formatter, tokenize
from slmops.errors import UsageError


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def supervised_text(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


def test_template_reads_shell_escapes_and_splits_at_last_placeholder():
    t = Template.parse("Review: {phrase}\\nTone: {tone}")
    assert t.fields == ("phrase", "tone")
    text, spans = t({"phrase": "good film", "tone": "positive"})
    assert text == "Review: good film\nTone: positive"
    assert text[spans[0][0]:spans[0][1]] == "positive"


def test_template_keeps_text_after_last_placeholder_in_response():
    t = Template.parse("Q: {q} A: {a} <end>")
    text, [(start, end)] = t({"q": "x", "a": "y"})
    assert text[start:end] == "y <end>"


def test_template_literal_braces():
    t = Template.parse('{{"q": "{q}"}} -> {a}')
    text, [(start, _)] = t({"q": "x", "a": "y"})
    assert text == '{"q": "x"} -> y' and text[start:] == "y"


@pytest.mark.parametrize("template", ["no placeholders", "bad {", "{a.b}"])
def test_template_rejects_unusable(template):
    with pytest.raises(UsageError):
        Template.parse(template)


def test_missing_field_names_it_and_lists_present():
    with pytest.raises(UsageError, match=r"tone.*fields present: phrase, label"):
        Template.parse("{phrase} {tone}").check_columns(["phrase", "label"])


def test_labels_cover_only_response_and_eos(tok):
    t = Template.parse("Review: {phrase}\\nTone: {tone}")
    text, spans = t({"phrase": "good film", "tone": "positive"})
    out = tokenize([text], [spans], tok, max_len=64, train_on_prompt=False, add_eos=True)
    ids, labels = out.input_ids[0], out.labels[0]
    assert ids[-1] == tok.eos_token_id
    assert supervised_text(tok, ids, labels).replace(" ", "") == "positive<|im_end|>"
    assert labels[0] == IGNORE


def test_train_on_prompt_labels_everything(tok):
    text, spans = Template.parse("A {x} B {y}")({"x": "good", "y": "bad"})
    out = tokenize([text], [spans], tok, 64, train_on_prompt=True, add_eos=False)
    assert out.labels[0] == out.input_ids[0]


def test_truncation_counted_and_rows_without_response_dropped(tok):
    t = Template.parse("{p} => {r}")
    rows = [{"p": "good " * 40, "r": "fine"}, {"p": "bad", "r": "dull"}]
    rendered = [t(r) for r in rows]
    out = tokenize([x for x, _ in rendered], [s for _, s in rendered], tok, 12, False, True)
    assert out.truncated == 1 and out.dropped == 1 and len(out.input_ids) == 1
    assert all(len(ids) <= 12 for ids in out.input_ids)


def test_chat_masks_assistant_turns_only(tok):
    fmt = chat_formatter(tok, "messages")
    messages = [{"role": "user", "content": "good film"}, {"role": "assistant", "content": "positive"},
                {"role": "user", "content": "dull plot"}, {"role": "assistant", "content": "negative"}]
    text, spans = fmt({"messages": messages})
    assert [text[s:e] for s, e in spans] == ["positive<|im_end|>", "negative<|im_end|>"]
    out = tokenize([text], [spans], tok, 256, False, add_eos=True, add_special_tokens=False)
    learned = supervised_text(tok, out.input_ids[0], out.labels[0])
    assert learned.replace(" ", "") == "positive<|im_end|>negative<|im_end|>"
    assert out.input_ids[0].count(tok.eos_token_id) == 4  # one per turn, none appended


def test_chat_rejects_non_message_lists(tok):
    with pytest.raises(UsageError, match="list of"):
        chat_formatter(tok, "messages")({"messages": "hello"})


def test_text_field_learns_whole_text():
    text, spans = text_field_formatter("text")({"text": "abc"})
    assert spans == [(0, 3)]
