"""itera quantize: the format, RTN/GPTQ quality bounds, exact round trip, GGUF block parity, bad input
(``--method auto`` against llama.cpp: test_frontier.py; GGML block types: test_ggml.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_usage_error, file_key, run_itera
from itera.model.checkpoint import load_model
from itera.storage.layout import LayerQuant, dequantize, ggml_blocks, pack, rtn, unpack
from itera.quant.gptq import gptq
from itera.jobs.quantize import QuantizeOptions, quantize_in_memory
from itera.quant.plan import choose_plan
from itera.record import validate


CALIB = "pydocs@test"


def _quantize(model, out, *args):
    rec = run_itera("quantize", "--model", model, "--calib", CALIB, "--calib-samples", "128", "--calib-seqlen",
                    "128", "--eval-tokens", "6000", "--out", out, *args).record
    validate(rec)
    return rec


@pytest.fixture(scope="module")
def results(lm, tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    runs = {
        "int8": ["--method", "rtn", "--bits", "8"],
        "rtn4": ["--method", "rtn", "--bits", "4", "--group-size", "128"],
        "gptq4": ["--method", "gptq", "--bits", "4", "--group-size", "128"],
    }
    out = {k: _quantize(lm, d / k, *v) for k, v in runs.items()}
    out["dir"] = d
    return out


def test_int8_per_channel_within_one_percent(results):
    m = results["int8"]["metrics"]
    assert m["perplexity_after"] <= m["perplexity_before"] * 1.01
    assert 8.0 < m["bits_per_weight"] < 8.2  # int8 codes + one float16 scale per row
    assert m["size_ratio"] > 2.5


def test_gptq_beats_round_to_nearest_at_4_bits_group_128(results):
    rtn4, gptq4 = results["rtn4"]["metrics"], results["gptq4"]["metrics"]
    assert gptq4["bits_per_weight"] == rtn4["bits_per_weight"] == pytest.approx(4 + 16 / 128)
    assert gptq4["perplexity_after"] < rtn4["perplexity_after"], (gptq4["perplexity_after"], rtn4["perplexity_after"])
    # GPTQ trades weight error for output error: its outputs on calibration data are closer
    out_err = lambda m: sum(v["output_error"] for v in m["layers"].values())  # noqa: E731
    assert out_err(gptq4) < out_err(rtn4)


def test_round_trip_reproduces_in_memory_logits_exactly(teacher, distill_corpus, tmp_path):
    for args in (dict(method="gptq", bits=4, group_size=32), dict(method="rtn", bits=3, group_size=64, sym=False),
                 dict(method="rtn", bits=2, quantize_embeddings=True),
                 dict(method="gptq", gguf_type="IQ4_NL", quantize_embeddings=True),
                 dict(method="rtn", gguf_type="Q4_K")):  # hidden 128: Q4_K falls back to Q5_0, as in llama.cpp
        out = tmp_path / "q"
        opts = QuantizeOptions(model=teacher, out=out, calib=str(distill_corpus), calib_samples=4, calib_seqlen=64,
                               eval_tokens=200, **args)
        mem = quantize_in_memory(opts)[1]
        loaded, cfg = load_model(out)
        assert cfg.quantization["layers"]
        x = torch.randint(0, cfg.vocab_size, (2, 30))
        with torch.no_grad():
            assert torch.equal(mem(x), loaded(x)), args


def test_evaluate_runs_on_a_quantized_checkpoint(results, distill_corpus):
    q = results["dir"] / "gptq4"
    rec = run_itera("evaluate", "--model", q, "-d", distill_corpus, "--max-tokens", "500").record
    assert rec["metrics"]["datasets"][file_key(distill_corpus)]["perplexity"] > 1
    assert results["gptq4"]["artifact"]["format"] == "itera-quant"


# ------------------------------------------------------------------------------- the format


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (7, 64))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits, 64), codes)


@pytest.mark.parametrize("bits,qtype", [(4, "Q4_0"), (8, "Q8_0")])
def test_symmetric_group_32_is_exactly_a_ggml_block(bits, qtype):
    """Blocks written from our codes decode, with gguf's own reference dequantizer, to our weights."""
    import gguf

    w = torch.randn(6, 128) * 0.05
    codes, scales, zeros = rtn(w, LayerQuant(bits, 32, True))
    ours = dequantize(codes, scales, zeros).numpy()
    blocks = ggml_blocks(codes, scales, bits)
    theirs = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, qtype))
    assert theirs.shape == ours.shape and np.array_equal(theirs, ours)
    # and ggml's own quantizer agrees with our scale rule on what d is
    ref_blocks = gguf.quants.quantize(w.numpy(), getattr(gguf.GGMLQuantizationType, qtype))
    ref_d = ref_blocks.reshape(6, 4, -1)[..., :2].copy().view(np.float16).reshape(6, 4)
    assert np.allclose(ref_d.astype(np.float32), scales.numpy(), rtol=2e-3) if qtype == "Q4_0" else True


def test_gptq_reduces_output_error_against_rtn_on_a_known_hessian():
    torch.manual_seed(0)
    x = torch.randn(512, 64) @ torch.randn(64, 64) * 0.3  # correlated inputs: where GPTQ helps
    w = torch.randn(32, 64)
    h = x.T @ x / x.shape[0]
    q = LayerQuant(3, 32, True)

    def out_err(codes, scales, zeros):
        return ((x @ (w - dequantize(codes, scales, zeros)).T) ** 2).mean().item()

    assert out_err(*gptq(w, h, q)) < 0.8 * out_err(*rtn(w, q))
    assert out_err(*gptq(w, h, q, act_order=True)) < out_err(*rtn(w, q))


def test_choose_plan_is_optimal_on_a_small_case():
    costs = {"a": {2: 10, 4: 20, 8: 40}, "b": {2: 10, 4: 20, 8: 40}, "c": {2: 10, 4: 20, 8: 40}}
    losses = {"a": {2: 9.0, 4: 1.0, 8: 0.0}, "b": {2: 0.5, 4: 0.2, 8: 0.0}, "c": {2: 5.0, 4: 3.0, 8: 0.0}}
    import itertools

    best = min((sum(losses[n][b] for n, b in zip("abc", combo)), combo)
               for combo in itertools.product((2, 4, 8), repeat=3)
               if sum(costs[n][b] for n, b in zip("abc", combo)) <= 70)
    plan = choose_plan(costs, losses, 70)
    assert tuple(plan[n] for n in "abc") == best[1]


# ------------------------------------------------------------------------------- bad input


def test_bad_input(teacher, distill_corpus, tmp_path, results):
    q = ["quantize", "--model", teacher, "--out", tmp_path / "q"]
    assert_usage_error(run_itera(*q, "--method", "rtn", "--bits", "5"), "--bits 5 is not supported")
    short = tmp_path / "short.txt"
    short.write_text("The old fox sees the owl near the river. " * 3)
    assert_usage_error(run_itera(*q, "--method", "gptq", "--calib", short), "shorter than one sequence")
    assert_usage_error(run_itera("quantize", "--model", results["dir"] / "rtn4", "--out", tmp_path / "q2",
                                 "--method", "rtn"), "is already quantized (rtn, 4 bits)")
    assert_usage_error(run_itera(*q, "--method", "gptq"), "--method gptq needs calibration text")
    assert_usage_error(run_itera(*q, "--method", "auto", "--calib", distill_corpus),
                       "--method auto needs one of --target-bpw")
    assert_usage_error(run_itera(*q, "--method", "rtn", "--gguf-type", "Q9_K"), "unknown --gguf-type 'Q9_K'")
    assert not (tmp_path / "q").exists() and not (tmp_path / "q2").exists()


# ------------------------------------------------------------------------------- widths that don't fit


def test_gptq_group_32_on_a_172_wide_ffn_falls_back_and_keeps_perplexity(stories, tmp_path):
    """No group of 32 (nor 16) divides stories' 172-wide FFN: down_proj falls back to one scale
    per row, the record says so, and the model loses under 1% perplexity on held-out text."""
    rec = _quantize(stories, tmp_path / "g32", "--method", "gptq", "--bits", "4", "--group-size", "32")
    m = rec["metrics"]
    down = [fb for fb in m["fallbacks"] if fb["tensor"].endswith("mlp.down_proj")]
    assert len(down) == 3 and len(m["fallbacks"]) == 3
    assert down[0]["wanted"] == "4-bit group 32 sym" and down[0]["used"] == "4-bit per-channel sym"
    assert "32 does not divide its 172 input columns" in down[0]["reason"]
    cfg = json.loads((tmp_path / "g32" / "config.json").read_text())["quantization_config"]["layers"]
    assert cfg["model.layers.0.mlp.down_proj"]["group_size"] is None and cfg["model.layers.0.mlp.up_proj"]["group_size"] == 32
    assert m["perplexity_after"] <= m["perplexity_before"] * 1.01, (m["perplexity_before"], m["perplexity_after"])


def test_a_group_that_does_not_divide_falls_back_to_a_smaller_one(teacher, tmp_path):
    rec = run_itera("quantize", "--model", teacher, "--method", "rtn", "--group-size", "96", "--out", tmp_path / "q").record
    fb = rec["metrics"]["fallbacks"]
    # hidden 128: 96 does not divide it, 48 does not either, 24 neither; 128's FFN inputs (384) are divided by 96
    assert {f["used"] for f in fb} == {"4-bit per-channel sym"} and all("96 does not divide" in f["reason"] for f in fb)
    assert len(fb) == 4 * 6  # q, k, v, o, gate, up of each of the 4 layers (down_proj's 384 columns take 96)


def test_fallbacks_in_one_line_and_the_held_out_tokens_named(tiny_ckpt, corpus_file, tmp_path):
    """--gguf-type Q4_K on rows of 32 and 64: every layer falls back to Q5_0, said in one stderr
    line; the held-out perplexity says which tokens it used (the last 10% of --calib), in the
    record and on stderr, so it can be told apart from distill's 5%."""
    from itera.data import canonical, split_heldout

    res = run_itera("quantize", "--model", tiny_ckpt, "--method", "rtn", "--gguf-type", "Q4_K", "--calib",
                    corpus_file, "--calib-samples", "2", "--calib-seqlen", "32", "--eval-tokens", "200",
                    "--out", tmp_path / "q")
    m = res.record["metrics"]
    assert len(m["fallbacks"]) == 14 and {fb["used"] for fb in m["fallbacks"]} == {"Q5_0"}
    lines = [line for line in res.stderr.splitlines() if "fell back" in line or "fallback:" in line]
    assert lines == [f"14 tensors fell back from Q4_K to Q5_0 ×14: {m['fallbacks'][0]['tensor']}, "
                     f"{m['fallbacks'][1]['tensor']}, {m['fallbacks'][2]['tensor']} …and 11 more (each listed "
                     "with its reason in the record's fallbacks)"], res.stderr
    h = m["heldout_split"]
    text = corpus_file.read_text()
    head = split_heldout(text, 0.1)[0]
    assert h["source"] == canonical(str(corpus_file)) and h["fraction"] == 0.1 and h["excluded_from"] == "calibration"
    assert h["chars"] == [len(head), len(text)] and h["tokens_scored"] == m["eval_tokens"] == 199
    assert f"on the last 10% of {h['source']} (characters {len(head):,}–{len(text):,}" in res.stderr


def test_a_calibration_text_too_short_for_its_windows_is_said_once(tiny_ckpt, corpus_file, tmp_path):
    """Windows longer end to end than the text overlap: one warning line naming both figures."""
    from itera.data import split_heldout
    from itera.tokenizer import Tokenizer

    short = tmp_path / "short.txt"
    short.write_text(corpus_file.read_text()[:3000])
    n = len(Tokenizer.from_dir(tiny_ckpt).encode(split_heldout(short.read_text(), 0.1)[0], add_bos=False))
    args = ["quantize", "--model", tiny_ckpt, "--method", "gptq", "--calib", short, "--calib-seqlen", "32",
            "--eval-tokens", "50"]
    res = run_itera(*args, "--calib-samples", str(n // 32 + 1), "--out", tmp_path / "q")
    assert res.returncode == 0, res.stderr
    warned = [line for line in res.stderr.splitlines() if "calibration text gives" in line]
    assert warned == [f"warning: the calibration text gives {n:,} tokens, fewer than --calib-samples {n // 32 + 1} "
                      f"x --calib-seqlen 32 = {(n // 32 + 1) * 32:,}: the windows overlap; pass more text or fewer "
                      "samples"], res.stderr
    res = run_itera(*args, "--calib-samples", str(n // 32), "--out", tmp_path / "q2")
    assert "calibration text gives" not in res.stderr and res.record["metrics"]["perplexity_after"] > 1


def test_the_fisher_pass_takes_more_sequences_on_smaller_models():
    """The predicted planner's noise falls with its sequences (itera/jobs/quantize.py); their cost,
    parameters x sequences, stays at most 1e9 or 8 sequences' worth, and never past what there is."""
    from itera.jobs.quantize import fisher_windows

    assert [fisher_windows(p, 128) for p in (2_000_000, 31_250_000, 62_500_000, 100_000_000, 135_000_000,
                                                 1_100_000_000)] == [32, 32, 16, 10, 8, 8]
    assert fisher_windows(2_000_000, 5) == 5
