"""The record protocol: building, schema validation, parsing stdin, atomic writes, digests."""

from __future__ import annotations

import io
import json

import pytest

from itera import record
from itera.errors import InputError, RecordError


def _rec(**kw):
    run = record.Run("evaluate", parent=kw.pop("parent", None))
    metrics = {"datasets": {"x.txt": {"perplexity": 3.5, "bits_per_byte": 1.2, "tokens": 10, "bytes": 40,
                                      "tokens_per_s": 100.0}}}
    return run.record(kw.pop("artifact", None), metrics, {"window": 8})


def test_built_record_validates_and_round_trips():
    rec = _rec()
    assert rec["itera"] == 1 and rec["status"] == "ok" and rec["parent"] is None
    assert record.parse_record(record.dumps(rec).encode()) == rec
    child = _rec(parent=rec)
    assert record.parse_record(record.dumps(child).encode())["parent"] == rec


def test_schema_rejects_evaluate_record_without_dataset_keys():
    rec = _rec()
    del rec["metrics"]["datasets"]["x.txt"]["bits_per_byte"]
    with pytest.raises(RecordError, match="bits_per_byte"):
        record.validate(rec)


def test_schema_rejects_nan():
    rec = _rec()
    rec["metrics"]["datasets"]["x.txt"]["perplexity"] = float("nan")
    with pytest.raises(ValueError):
        record.dumps(rec)


def test_emit_one_line_and_metrics_out(tmp_path):
    rec = _rec()
    out = io.StringIO()
    record.emit(rec, out=out, metrics_out=tmp_path / "sub" / "m.json")
    assert out.getvalue().count("\n") == 1 and json.loads(out.getvalue()) == rec
    assert json.loads((tmp_path / "sub" / "m.json").read_text()) == rec


class _Pipe(io.BytesIO):
    def isatty(self):
        return False

    @property
    def buffer(self):
        return self


def test_read_parent_from_pipe_and_empty_pipe():
    rec = _rec()
    assert record.read_parent(_Pipe(record.dumps(rec).encode() + b"\n")) == rec
    assert record.read_parent(_Pipe(b"")) is None
    pretty = json.dumps(rec, indent=2).encode()  # a record pretty-printed on a terminal, then saved
    assert record.read_parent(_Pipe(pretty)) == rec


def test_input_path_precedence(tmp_path):
    rec = _rec(artifact={"path": "from/record", "kind": "checkpoint", "format": "safetensors", "bytes": 1,
                         "sha256": None})
    assert str(record.input_path(tmp_path, rec, "--model")) == str(tmp_path)
    assert str(record.input_path(None, rec, "--model")) == "from/record"
    with pytest.raises(InputError, match="pass --model PATH"):
        record.input_path(None, None, "--model")
    with pytest.raises(RecordError, match="no artifact path"):
        record.input_path(None, _rec(), "--model")


def test_atomic_dir_leaves_nothing_on_failure_and_replaces_on_success(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with record.atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with record.atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with record.atomic_dir(final) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_file_failure_keeps_old_content(tmp_path):
    f = tmp_path / "f.json"
    f.write_text("old")
    with pytest.raises(KeyError):
        with record.atomic_file(f) as tmp:
            tmp.write_text("new")
            raise KeyError
    assert f.read_text() == "old" and list(tmp_path.iterdir()) == [f]


def test_directory_digest_tracks_content_and_names(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("hello")
    size, h1 = record.artifact_digest(d)
    assert size == 5
    (d / "a.txt").write_text("hellp")
    assert record.artifact_digest(d)[1] != h1
    (d / "a.txt").rename(d / "b.txt")
    assert record.artifact_digest(d)[1] not in (h1,)
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    assert record.artifact_digest(f) == (3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
