"""itera evaluate: the sliding-window protocol, parity with transformers, and the CLI record."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import file_key, run_itera
from itera.scoring import EvalOptions, evaluate_text, windows
from itera.record import validate
from itera.runtime import open_runtime


@pytest.mark.parametrize("n,window,stride", [(2, 2, 1), (10, 4, 2), (100, 16, 5), (17, 16, 15), (5, 512, 256),
                                             (1000, 64, 63), (33, 8, 1)])
def test_windows_score_every_token_once_with_bounded_context(n, window, stride):
    scored = []
    for begin, end, n_score in windows(n, window, stride):
        assert 0 <= begin < end <= n and end - begin <= window
        assert 1 <= n_score <= end - begin - (1 if begin == 0 else 0)
        scored.extend(range(end - n_score, end))
    assert scored == list(range(1, n))  # each token after the first, once, in order
    # Every window after the first is as long as the stream allows: full context for its targets.
    plan = list(windows(n, window, stride))
    for begin, end, n_score in plan[1:]:
        assert end - begin == min(window, end)


def _hf_sliding_nll(ckpt, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Independent reference: transformers' model, labels masked with -100 outside each window's targets."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    x = torch.tensor(ids)
    total, count, prev_end, end = 0.0, 0, 0, 0
    while end < len(ids):
        end = min(window, len(ids)) if prev_end == 0 else min(prev_end + stride, len(ids))
        begin = max(0, end - window)
        inp = x[begin:end][None]
        labels = inp.clone()
        labels[0, : (prev_end - begin) if prev_end else 1] = -100  # only tokens after prev_end are targets
        n_targets = int((labels[0, 1:] != -100).sum())
        with torch.no_grad():
            loss = model(inp, labels=labels).loss.item()  # mean over targets
        total += loss * n_targets
        count += n_targets
        prev_end = end
    return total, count


@pytest.mark.parametrize("window,stride,bos", [(64, 16, False), (48, 47, True), (256, 128, False)])
def test_perplexity_matches_transformers(tiny_ckpt, corpus_file, window, stride, bos):
    text = corpus_file.read_text()[:6000]
    rt = open_runtime(tiny_ckpt)
    opts = EvalOptions(window=window, stride=stride, bos=bos, max_tokens=700).validate()
    ours = evaluate_text(rt, text, opts)
    ids = rt.tokenizer.encode(text, add_bos=bos)[:700]
    nll, count = _hf_sliding_nll(tiny_ckpt, ids, window, stride)
    assert ours["tokens"] == count == len(ids) - 1
    ref_ppl = math.exp(nll / count)
    assert abs(ours["perplexity"] - ref_ppl) / ref_ppl < 1e-4
    # bits per byte is the summed NLL in bits over the UTF-8 bytes of the evaluated text
    assert ours["bits_per_byte"] == pytest.approx(ours["nll_sum"] / math.log(2) / ours["bytes"], rel=1e-12)
    assert abs(ours["nll_sum"] - nll) / nll < 1e-4


def test_max_tokens_counts_bytes_of_the_kept_text(tiny_ckpt):
    rt = open_runtime(tiny_ckpt)
    text = "The old fox sees the river. The brave owl finds the ship." * 3
    full = evaluate_text(rt, text, EvalOptions(window=32, stride=16, bos=False))
    assert full["bytes"] == len(text.encode())
    cut = evaluate_text(rt, text, EvalOptions(window=32, stride=16, bos=False, max_tokens=10))
    kept = rt.tokenizer.decode(rt.tokenizer.encode(text, add_bos=False)[:10])
    assert cut["tokens"] == 9 and cut["bytes"] == len(kept.encode())


def test_cli_evaluate_record_from_stdin_parent(tiny_ckpt, corpus_file, tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ["The red fox sees the owl.", "The old ship."] * 20))
    first = run_itera("evaluate", "--model", tiny_ckpt, "--dataset", corpus_file, "--window", "64", "--stride", "32",
                      "--max-tokens", "400", "--metrics-out", tmp_path / "m.json")
    rec = first.record
    validate(rec)
    assert json.loads((tmp_path / "m.json").read_text()) == rec
    m = rec["metrics"]["datasets"][file_key(corpus_file)]
    assert m["tokens"] == 399 and m["perplexity"] > 1 and m["bits_per_byte"] > 0
    assert rec["params"]["window"] == 64 and rec["params"]["stride"] == 32 and rec["params"]["bos"] is True
    assert rec["artifact"]["path"] == str(tiny_ckpt) and len(rec["artifact"]["sha256"]) == 64
    # The next command reads its model from the record on stdin.
    second = run_itera("evaluate", "--dataset", jsonl, "--dataset", corpus_file, "--window", "64", "--stride", "32",
                       "--max-tokens", "400", "--no-bos", stdin=first.stdout)
    rec2 = second.record
    validate(rec2)
    assert rec2["parent"] == rec
    assert rec2["artifact"]["path"] == str(tiny_ckpt)
    assert set(rec2["metrics"]["datasets"]) == {file_key(jsonl), file_key(corpus_file)}
    assert rec2["params"]["datasets_paths"] == {file_key(jsonl): str(jsonl.resolve()),
                                                file_key(corpus_file): str(corpus_file.resolve())}
    assert rec2["params"]["bos"] is False
    # Without BOS, the first real token is no longer scored: one token fewer.
    assert rec2["metrics"]["datasets"][file_key(corpus_file)]["tokens"] == 399
