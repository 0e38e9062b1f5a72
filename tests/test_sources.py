from __future__ import annotations

import collections

import pytest

from conftest import sentiment_rows, write_jsonl
from slmops.data.sources import hold_out, load_split
from slmops.errors import UsageError


def test_direct_jsonl_path_and_slices(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(20))
    assert len(load_split(str(f), None, "train")) == 20
    assert len(load_split(str(f), None, "train[:5]")) == 5
    assert load_split(str(f), None, "train[5:7]")[0] == sentiment_rows(20)[5]
    assert len(load_split(str(f), None, "train[:10%]")) == 2


def test_builder_with_data_files_tsv_csv_parquet(tmp_path):
    rows = sentiment_rows(6)
    tsv = tmp_path / "d.tsv"
    tsv.write_text("phrase\ttone\n" + "".join(f"{r['phrase']}\t{r['tone']}\n" for r in rows))
    assert load_split(str(tsv), None, "train")["tone"] == [r["tone"] for r in rows]
    csv = tmp_path / "d.csv"
    csv.write_text("phrase,tone\n" + "".join(f"{r['phrase']},{r['tone']}\n" for r in rows))
    assert len(load_split("csv", [str(csv)], "train")) == 6
    import pandas as pd
    pq = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(pq)
    assert load_split(str(pq), None, "train")[0] == rows[0]


@pytest.mark.parametrize("split, message", [
    ("train[:0]", "corresponds to no data"),
    ("train[5:oops]", "cannot take split"),
    ("validation", "cannot take split"),
])
def test_bad_or_empty_split(tmp_path, split, message):
    f = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(10))
    with pytest.raises(UsageError, match=message):
        load_split(str(f), None, split)


def test_empty_file(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    with pytest.raises(UsageError, match="no rows|empty"):
        load_split(str(f), None, "train")


def test_malformed_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"phrase": "a", "tone": "b"}\n{"phrase": "c", tone: "d"}\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:2: malformed JSON line"):
        load_split(str(f), None, "train")


def test_json_array_file_is_accepted_and_checked(tmp_path):
    good = tmp_path / "a.json"
    good.write_text('[{"x": "1"}, {"x": "2"}]')
    assert len(load_split(str(good), None, "train")) == 2
    bad = tmp_path / "b.json"
    bad.write_text('[{"x": "1"},\n {"x": }]')
    with pytest.raises(UsageError, match=r"b.json:2:\d+: malformed JSON"):
        load_split(str(bad), None, "train")


@pytest.mark.parametrize("name, files, message", [
    ("missing/file.jsonl", None, "data file not found"),
    ("json", None, "needs --data_files"),
    ("json", ["nope.json"], "data file not found"),
    (None, None, "no data given"),
])
def test_missing_sources(name, files, message):
    with pytest.raises(UsageError, match=message):
        load_split(name, files, "train")


def test_unreadable_and_wrong_kind_files(tmp_path):
    with pytest.raises(UsageError, match="is a folder"):
        load_split("json", [str(tmp_path)], "train")
    txt = tmp_path / "d.txt"
    txt.write_text("hi")
    with pytest.raises(UsageError, match="unsupported file type"):
        load_split("json", [str(txt)], "train")
    binary = tmp_path / "d.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_split(str(binary), None, "train")


def test_hold_out_is_stratified_and_seeded(tmp_path):
    rows = [dict(r, tone="positive") for r in sentiment_rows(10)] + [dict(r, tone="negative") for r in sentiment_rows(90)]
    ds = load_split(str(write_jsonl(tmp_path / "d.jsonl", rows)), None, "train")
    train, held = hold_out(ds, 0.1, seed=1, stratify_values=ds["tone"])
    counts = collections.Counter(held["tone"])
    assert counts == {"positive": 1, "negative": 9}
    assert len(train) + len(held) == 100
    again = hold_out(ds, 0.1, seed=1, stratify_values=ds["tone"])[1]
    assert again["phrase"] == held["phrase"]


def test_hold_out_keeps_every_class_with_two_or_more_rows(tmp_path):
    rows = [dict(r, tone="rare") for r in sentiment_rows(3)] + [dict(r, tone="common") for r in sentiment_rows(40)]
    ds = load_split(str(write_jsonl(tmp_path / "d.jsonl", rows)), None, "train")
    _, held = hold_out(ds, 0.1, seed=0, stratify_values=ds["tone"])
    assert "rare" in held["tone"]


def test_folder_of_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(6))
    write_jsonl(tmp_path / "validation.jsonl", sentiment_rows(2))
    assert len(load_split(str(tmp_path), None, "train")) == 6
    assert len(load_split(str(tmp_path), None, "validation[:1]")) == 1
