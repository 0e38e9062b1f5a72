"""`slmops data check`: the data doctor, and the checks `finetune` shares with it."""

from __future__ import annotations


from conftest import TEMPLATE, sentiment_rows, write_jsonl
from slmops.cli import main


def check(capsys, *argv) -> tuple[int, str, str]:
    code = main(["data", "check", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_report_counts_what_matters(tiny_llama, tmp_path, capsys):
    rows = [{**r, "phrase": f"{r['phrase']} {i}"} for i, r in enumerate(sentiment_rows(40))]
    rows = rows + rows[:6]  # six exact duplicates
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    code, out, err = check(capsys, "-m", str(tiny_llama), "-d", str(data), "--text_template", TEMPLATE,
                           "--eval_split", "train[:10]")
    assert code == 0, err
    assert "duplicate training rows: 6" in out
    assert "validation rows also in training: 10" in out  # the validation rows are training rows too
    assert "'positive'" in out and "'negative'" in out and "imbalance 1.0:1" in out
    assert "truncated at --max_seq_len 1024 (0.0%)" in out
    # the example marks exactly the response the loss covers
    first = rows[0]
    assert f"Tone:[[ {first['tone']}<|im_end|>]]" in out  # the space is part of the answer's first token
    assert "also appear in the training rows" in err and "repeat an earlier row" in err


def test_imbalance_is_reported(tiny_llama, tmp_path, capsys):
    rows = [{"phrase": r["phrase"], "tone": "positive" if i % 12 else "negative"}
            for i, r in enumerate(sentiment_rows(48))]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    code, out, err = check(capsys, "-m", str(tiny_llama), "-d", str(data), "--text_template", TEMPLATE,
                           "--eval_split", "train[:4]")
    assert code == 0, err
    assert "'positive'     44" in out and "'negative'      4" in out
    assert "imbalance 11.0:1" in out and "imbalanced 11:1" in err


def test_nothing_to_learn_is_fatal_with_the_reason(tiny_llama, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": r["phrase"]}]} for r in sentiment_rows(8)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    code, out, err = check(capsys, "-m", str(tiny_llama), "-d", str(data), "--use_chat_template",
                           "--add_eos", "false")
    assert code == 2
    assert "none of the 7 rows renders a response" in err and "Traceback" not in err
