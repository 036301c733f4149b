"""The record protocol: building, schema validation, parsing stdin."""

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
