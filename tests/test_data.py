"""Data sources: local files, the built-in corpus, and hub names failing fast offline."""

from __future__ import annotations

import os
import socket
import threading
import time
from urllib.parse import urlparse

import pytest

from conftest import assert_usage_error, run_itera
from itera.data import ROW_SEPARATOR, load_text
from itera.errors import DataError


def test_txt_is_one_text(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("line one\n\nline two\n")
    src = load_text(str(p))
    assert src.rows == ["line one\n\nline two\n"] and src.text == "line one\n\nline two\n"


def test_jsonl_rows_joined_with_blank_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    assert load_text(str(p)).text == "first" + ROW_SEPARATOR + "second"


def test_jsonl_without_text_field_names_the_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "ok"}\n{"body": "no"}\n')
    with pytest.raises(DataError, match="line 2 has no string \"text\" field"):
        load_text(str(p))


def test_parquet_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta"], "n": [1, 2]}), p)
    assert load_text(str(p)).rows == ["alpha", "beta"]
    pq.write_table(pa.table({"body": ["alpha"]}), p)
    with pytest.raises(DataError, match="no \"text\" column"):
        load_text(str(p))


def test_empty_and_non_utf8_files(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("  \n")
    with pytest.raises(DataError, match="holds no text"):
        load_text(str(p))
    p.write_bytes(b"\xff\xfeabc")
    with pytest.raises(DataError, match="not UTF-8"):
        load_text(str(p))


def test_builtin_corpus_splits_are_disjoint_and_nonempty():
    train, test = load_text("pydocs@train"), load_text("pydocs@test")
    assert len(train.text) > 500_000 and len(test.text) > 20_000
    assert not set(train.rows) & set(test.rows) - {""}
    assert load_text("pydocs").rows == test.rows  # evaluation defaults to the test split
    assert load_text("pydocs", purpose="train").rows == train.rows
    with pytest.raises(DataError, match="unknown split"):
        load_text("pydocs@validation")


def _hub_reachable_from_here(timeout: float = 3.0) -> bool:
    """A real probe: does the Hub's host (``HF_ENDPOINT``, default huggingface.co) accept a TCP
    connection? Run in a thread, since name resolution ignores socket timeouts."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    ok = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout + 1)
    return bool(ok)


@pytest.mark.skipif(_hub_reachable_from_here(), reason="the Hugging Face Hub is reachable from this machine: "
                    "this test is about failing fast without network")
@pytest.mark.parametrize("name", ["wikitext-2", "tinystories", "someone/some-dataset:cfg@train"])
def test_hub_names_fail_fast_offline_with_a_local_file_hint(tiny_ckpt, name):
    t0 = time.perf_counter()
    # HF_HUB_OFFLINE is unset so that the reachability probe itself is exercised.
    res = run_itera("evaluate", "--model", tiny_ckpt, "--dataset", name, env={"HF_HUB_OFFLINE": ""})
    elapsed = time.perf_counter() - t0
    line = assert_usage_error(res, repr(name), "pass a local file instead")
    assert "not in the local cache and the Hugging Face Hub is unreachable" in line  # offline, as probed above
    assert elapsed < 5.0 + 2.0  # < 5 s of itera's own time, plus Python's start-up in this subprocess
