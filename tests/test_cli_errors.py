"""Bad input: exit code 2, one line on stderr naming the problem, empty stdout, no traceback."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from conftest import assert_usage_error, run_itera


def evaluate(model, *extra, stdin=None):
    return run_itera("evaluate", "--model", model, "--dataset", "unused.txt", *extra, stdin=stdin)


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def test_missing_path(tmp_path):
    assert_usage_error(evaluate(tmp_path / "nope"), "does not exist")


def test_directory_without_config(tmp_path):
    assert_usage_error(evaluate(tmp_path), "has no config.json")


def test_model_type_outside_llama_family(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    assert_usage_error(evaluate(ckpt_copy), "model_type 'gpt2'", "not a Llama-family model")


def test_zero_byte_safetensors(ckpt_copy):
    (ckpt_copy / "model.safetensors").write_bytes(b"")
    assert_usage_error(evaluate(ckpt_copy), "model.safetensors is truncated")


def test_truncated_safetensors(ckpt_copy):
    p = ckpt_copy / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    assert_usage_error(evaluate(ckpt_copy), "is truncated", "re-copy or re-save")


def test_overlapping_offsets(ckpt_copy):
    p = ckpt_copy / "model.safetensors"
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = header[names[0]], header[names[1]]
    # Point the second tensor at bytes inside the first (same length keeps the size check happy).
    length = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0] + 4, a["data_offsets"][0] + 4 + length]
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))  # keep the header length so the data section is unchanged
    assert len(new) == n
    p.write_bytes(raw[:8] + new + raw[8 + n:])
    assert_usage_error(evaluate(ckpt_copy), "overlap")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickled_checkpoint_refused(ckpt_copy, name):
    (ckpt_copy / "model.safetensors").unlink()
    # A pickle that would run code if loaded: itera must refuse without opening it.
    (ckpt_copy / name).write_bytes(b"\x80\x04cos\nsystem\n(S'touch /tmp/itera-pwned'\ntR.")
    line = assert_usage_error(evaluate(ckpt_copy), "never unpickles")
    assert name in line


def test_bare_pickle_file_refused(tmp_path):
    f = tmp_path / "weights.pt"
    f.write_bytes(b"not really")
    assert_usage_error(evaluate(f), "never unpickles")


def test_config_shapes_disagree_with_weights(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    assert_usage_error(evaluate(ckpt_copy), "mlp", "config.json implies", "does not match the weights")


def test_config_not_json(ckpt_copy):
    (ckpt_copy / "config.json").write_text("{not json")
    assert_usage_error(evaluate(ckpt_copy), "config.json is not valid JSON")


@pytest.mark.parametrize("stdin,needle", [
    (b"{this is not json", "stdin is not a JSON record"),
    (b'{"itera": 1}\n{"itera": 1}\n', "more than one JSON document"),
    (b"\xff\xfe{}", "stdin is not UTF-8"),
    (b'{"hello": "world"}', "not an itera record"),
    (b'{"itera": 1, "command": "evaluate"}', "the record on stdin does not match the itera schema at (top level)"),
])
def test_bad_stdin(stdin, needle):
    assert_usage_error(run_itera("evaluate", "--dataset", "x.txt", stdin=stdin), needle)


def test_a_record_file_that_breaks_the_schema_is_named(tmp_path):
    bad = tmp_path / "old.json"
    bad.write_text('{"itera": 1, "command": "evaluate"}')
    res = run_itera("registry", "register", "--name", "m", "--record", bad, "--registry", tmp_path / "r.db")
    assert_usage_error(res, f"the record in {bad} does not match the itera schema at (top level)")
    assert not (tmp_path / "r.db").exists()


def test_no_input_at_all():
    assert_usage_error(run_itera("evaluate", "--dataset", "x.txt"), "pass --model PATH or pipe an itera record")


@pytest.mark.parametrize("args,needle", [
    (["--window", "1"], "--window must be at least 2"),
    (["--stride", "0"], "--stride must be at least 1 and smaller than --window"),
    (["--window", "64", "--stride", "64"], "smaller than --window 64"),
    (["--window", "64", "--stride", "100"], "smaller than --window 64"),
])
def test_bad_window_and_stride(tiny_ckpt, args, needle):
    assert_usage_error(evaluate(tiny_ckpt, *args), needle)


def test_window_longer_than_model_context(tiny_ckpt, corpus_file):
    res = run_itera("evaluate", "--model", tiny_ckpt, "--dataset", corpus_file, "--window", "1024", "--stride", "8")
    assert_usage_error(res, "exceeds the model's max_position_embeddings (256)")


def test_missing_dataset_file(tiny_ckpt, tmp_path):
    res = run_itera("evaluate", "--model", tiny_ckpt, "--dataset", tmp_path / "missing.txt")
    assert_usage_error(res, "missing.txt does not exist")


def test_unknown_option_is_one_line():
    res = run_itera("evaluate", "--no-such-flag")
    assert_usage_error(res, "--no-such-flag", "--help")


def test_a_failing_stage_in_a_pipe_is_the_one_error_downstream_stages_point_at(tiny_ckpt, corpus_file, tmp_path):
    """`a | b | c | d` under `set -o pipefail` with b failing: b's error is the only one that names a
    problem; c and d say the previous command wrote no record, each with its own exit code."""
    import subprocess
    import sys

    it = f"{sys.executable} -m itera"
    script = (f"set -o pipefail; {it} evaluate --model {tiny_ckpt} -d {corpus_file} --max-tokens 32 "
              f"| {it} export --format gguf --gguf-type Q9_9 --out {tmp_path / 'x.gguf'} "
              f"| {it} evaluate -d {corpus_file} "
              f"| {it} registry register --name m --registry {tmp_path / 'r.db'}")
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("itera: error:")]  # the first stage's log aside
    assert p.returncode == 2 and p.stdout == "", p.stderr
    assert len(lines) == 3, p.stderr
    assert "unknown --gguf-type" in lines[0] and "previous command" not in lines[0], lines
    assert all(ln.startswith("itera: error: no input: the previous command in the pipe wrote no record (it failed: "
                             "see its error above)") for ln in lines[1:]), lines
    assert sorted(q.name for q in tmp_path.iterdir()) == []
