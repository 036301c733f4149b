"""The record protocol: building, schema validation, parsing stdin."""

from __future__ import annotations

import io
import json
import re

import pytest

from itera import record
from itera.errors import InputError, RecordError


def _rec(**kw):
    run = record.Run("evaluate", parent=kw.pop("parent", None))
    metrics = {"datasets": {"x.txt": {"perplexity": 3.5, "bits_per_byte": 1.2, "tokens": 10, "bytes": 40,
                                      "tokens_per_s": 100.0}}}
    return run.record(kw.pop("artifact", None), metrics, {"window": 8, "stride": 4, "bos": True, "model": "m",
                                                          "runtime": "torch"})


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


# ------------------------------------------------------------------------------- per-command schema

_TRAIN = {"steps": 10, "batch_size": 8, "grad_accum": 1, "seq_len": 48, "lr": 3e-3, "seed": 0}
_BENCH = {"runs": 5, "prompt_tokens": 64, "gen_tokens": 64, "ttft_ms_p50": 1.5, "ttft_ms_p50_iqr": 0.1,
          "ttft_ms_p50_cv": 0.05, "prefill_tokens_per_s": 42000.0, "prefill_tokens_per_s_iqr": 900.0,
          "prefill_tokens_per_s_cv": 0.04, "decode_tokens_per_s": 5000.0, "decode_tokens_per_s_iqr": 80.0,
          "decode_tokens_per_s_cv": 0.02, "decode_latency_ms_p50": 0.2, "decode_latency_ms_p95": 0.25,
          "decode_latency_ms_p99": 0.3, "per_run": {"decode_tokens_per_s": [4900.0, 5000.0, 5100.0, 5000.0, 4950.0],
                                                    "ttft_ms": [1.4, 1.5, 1.6, 1.5, 1.5]},
          "wall_s": 0.1, "cpu_s": 0.1, "peak_rss_bytes": 60_000_000, "load_seconds": 0.2, "runtime": "llama.cpp",
          "threads": 2, "usable_cores": 2, "loadavg_start": 0.3, "loadavg_end": 0.4, "runnable_start": 0,
          "runnable_end": 1, "cpu_wait_fraction": 0.01,
          "stable": True, "stability_reason": None, "energy_method": "unavailable", "energy_reason": "no RAPL domains",
          "energy_j": None, "j_per_token": None, "tokens_per_j": None}
_PAIRS = {"loss": 0.69, "reward_accuracy": 0.5, "reward_margin": 0.0, "pairs": 10}
_REGISTRY = {"name": "m", "version": 1, "registry": "/tmp/r.db", "aliases": ["active"]}

# The smallest record each command can print: every key its schema block requires, and nothing else.
MINIMAL = {
    "distill": ({"student_params": 1000, "student_bytes": 4000, "tokens_seen": 3840, "tokens_per_s": 900.0,
                 "train_seconds": 4.2, "first_loss": 5.7, "final_loss": 3.1, "init_student_perplexity": 300.0,
                 "student_perplexity": 40.0, "heldout_tokens": 500, "eval_history": []},
                {"data": "d.txt", "out": "s", "teacher": None, "init": "random", "alpha": 0.0, "temperature": 2.0,
                 "kl": "forward", "train": _TRAIN, "processes": 1, "device": "cpu", "student_config": {}}),
    "quantize": ({"bits_per_weight": 4.5, "quantized_weights": 26624, "file_bits_per_param": 9.9, "source_bytes": 186072,
                  "quantized_bytes": 57192, "size_ratio": 3.25, "quantize_seconds": 1.8, "perplexity_before": None,
                  "perplexity_after": None, "eval_tokens": None, "mean_weight_error": 0.1, "layers": {}},
                 {"model": "m", "out": "q", "method": "gptq", "applied_method": "gptq", "bits": 4, "group_size": 32,
                  "sym": True, "calib": None}),
    "export": ({"max_abs_logit_diff": 0.002, "mean_abs_logit_diff": 0.0003, "top1_agreement": 1.0, "verify_tokens": 128,
                "verified": True, "tolerance": {"max_abs_logit_diff": 0.05}},
               {"model": "m", "out": "m.gguf", "format": "gguf", "allow_mismatch": False, "extra_outputs": []}),
    "evaluate": ({"datasets": {"x.txt": {"perplexity": 3.5, "bits_per_byte": 1.2, "tokens": 10, "bytes": 40,
                                         "tokens_per_s": 100.0}}},
                 {"window": 8, "stride": 4, "bos": True, "model": "m", "runtime": "torch"}),
    "benchmark-power": (_BENCH, {"model": "m.gguf", "compare": [], "prompt_tokens": 64, "gen_tokens": 64, "runs": 5,
                                 "warmup": 1, "threads": 2, "meter": "auto", "estimate": None}),
    "dpo-train": ({"train": _PAIRS, "heldout": None, "heldout_before": None, "kl_to_reference": None, "pairs_used": 10,
                   "pairs_heldout": 0, "pairs_dropped": 0, "dropped_reasons": {}, "reference_cache_hit": False,
                   "train_seconds": 1.0, "first_loss": 0.69, "final_loss": 0.6, "trainable_params": 1024},
                  {"model": "m", "out": "a", "beta": 0.1, "loss": "sigmoid", "lora_rank": 8, "lora_alpha": 16.0,
                   "train": _TRAIN, "processes": 1}),
    "discover-cluster": ({"hosts_reachable": 1, "hosts_unreachable": 0, "hosts_refused": 0, "total_cpus": 2,
                          "total_gpus": 0, "total_memory_bytes": 2**34, "hosts": [], "plan": {}},
                         {"hosts": ["localhost"], "timeout": 5.0, "deadline": 60.0, "launch": "distill --help",
                          "nproc_per_node": None, "rdzv_port": 29500}),
    "report": ({"artifacts": 2}, {"records": ["a.json"], "format": "md", "charts": []}),
    "registry register": ({}, {**_REGISTRY, "tags": {"stage": "dev"}, "git_commit": None}),
    "registry activate": ({}, _REGISTRY),
    "registry mark-good": ({}, _REGISTRY),
    "registry rollback": ({}, _REGISTRY),
    "registry promote": ({}, {**_REGISTRY, "gate": {"metric": "perplexity", "direction": "lower",
                                                   "max_regression": 0.02, "candidate": 3.0, "passed": True}}),
}

# One way each command's record can be wrong: (metrics or params, key, None to drop it or a wrong-typed value).
BROKEN = {
    "distill": ("metrics", "student_perplexity", None),
    "quantize": ("metrics", "bits_per_weight", "4.5"),
    "export": ("params", "format", None),
    "evaluate": ("params", "window", "512"),
    "benchmark-power": ("metrics", "threads", None),
    "dpo-train": ("metrics", "pairs_used", 10.5),
    "discover-cluster": ("metrics", "hosts_reachable", None),
    "report": ("params", "format", "pdf"),
    "registry register": ("params", "git_commit", None),
    "registry activate": ("params", "version", "1"),
    "registry mark-good": ("params", "name", None),
    "registry rollback": ("params", "aliases", "active"),
    "registry promote": ("params", "gate", None),
}


def _minimal(command: str) -> dict:
    metrics, params = MINIMAL[command]
    art = {"path": "x", "kind": "file", "format": "gguf", "bytes": 1, "sha256": None}
    return record.Run(command).record(art, json.loads(json.dumps(metrics)), json.loads(json.dumps(params)))


def test_every_command_that_prints_a_record_has_a_schema_block():
    blocks = {b["if"]["properties"]["command"].get("const") or b["if"]["properties"]["command"]["pattern"]
              for b in record.schema()["allOf"]}
    assert {"distill", "quantize", "export", "evaluate", "benchmark-power", "dpo-train", "discover-cluster",
            "report", "^registry ", "registry register", "registry promote"} <= blocks
    assert set(BROKEN) == set(MINIMAL)


@pytest.mark.parametrize("command", sorted(MINIMAL))
def test_the_minimal_record_of_each_command_validates(command):
    record.validate(_minimal(command))


@pytest.mark.parametrize("command", sorted(BROKEN))
def test_schema_refuses_a_record_missing_a_required_key_or_with_a_wrong_type(command):
    where, key, value = BROKEN[command]
    rec = _minimal(command)
    if value is None:
        del rec[where][key]
    else:
        rec[where][key] = value
    with pytest.raises(RecordError, match=re.escape(key)):
        record.validate(rec)


def test_schema_keeps_the_requirements_of_nested_and_conditional_blocks():
    rec = _minimal("distill")  # distilled from a teacher: the teacher's figures are required too
    rec["params"]["teacher"] = "runs/teacher"
    with pytest.raises(RecordError, match="teacher_params"):
        record.validate(rec)
    rec["metrics"].update(teacher_params=4000, compression_ratio=4.0, teacher_perplexity=30.0, kl_to_teacher=0.2,
                          top1_agreement=0.7)
    record.validate(rec)

    bench = _minimal("benchmark-power")
    bench["metrics"]["stable"] = False  # unstable needs the reason
    with pytest.raises(RecordError, match="stability_reason"):
        record.validate(bench)
    bench = _minimal("benchmark-power")
    bench["metrics"]["energy_j"] = 1.0  # no meter, yet a figure: invented
    with pytest.raises(RecordError, match="energy_j"):
        record.validate(bench)
    bench = _minimal("benchmark-power")
    other = {**_BENCH, "threads": None}  # every compared artifact's block follows the same rules
    bench["metrics"]["compare"] = {"a.gguf": dict(_BENCH), "b.gguf": other}
    with pytest.raises(RecordError, match="threads"):
        record.validate(bench)
    bench["metrics"]["compare"]["b.gguf"]["threads"] = 2
    record.validate(bench)

    promote = _minimal("registry promote")
    del promote["params"]["aliases"]  # the block every registry subcommand shares applies too
    with pytest.raises(RecordError, match="aliases"):
        record.validate(promote)


def test_ancestors_walk_the_parent_chain_nearest_first():
    grand = _rec()
    parent = _rec(parent=grand)
    child = _rec(parent=parent)
    assert list(record.ancestors(child)) == [parent, grand]
    assert list(record.ancestors(child, include_self=True)) == [child, parent, grand]
    assert list(record.ancestors(grand)) == []
    assert list(record.ancestors(None)) == [] and list(record.ancestors(None, include_self=True)) == []
    # a terminal summary's parent is a string, not a record: the chain ends there
    assert list(record.ancestors({**child, "parent": "evaluate x <- evaluate y"})) == []
