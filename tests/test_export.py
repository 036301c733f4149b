"""itera export: every artifact checked in its own runtime against the source model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_usage_error, llama_logp, mean_kl, run_itera, save_tiny
from itera.scoring import EvalOptions, evaluate_text
from itera.model.checkpoint import load_model
from itera.record import validate
from itera.runtime import open_runtime
from itera.tokenizer import Tokenizer

MULTILINGUAL = ("English text, naïve café — “quotes”; Deutsch: Größe, Straße; français: où êtes-vous? "
                "español: ¿qué tal? 日本語のテキスト 北京 Привет мир 🙂 tabs\tand  double  spaces\n\nnew lines "
                "code: def f(x): return {'k': x ** 2} # 12345 3.14159")


def export(model, out, *args):
    return run_itera("export", "--model", model, "--out", out, *args)


@pytest.fixture(scope="module")
def tiny_variants(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("variants")
    return {
        "gqa-untied": save_tiny(d / "gqa", tokenizer_dir, num_key_value_heads=2),
        "tied-mha": save_tiny(d / "tied", tokenizer_dir, num_key_value_heads=4, tie_word_embeddings=True),
        "llama3-rope": save_tiny(d / "l3", tokenizer_dir, num_key_value_heads=2, rope_theta=500.0,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "linear-rope-qkv-bias": save_tiny(d / "lin", tokenizer_dir, num_key_value_heads=1, attention_bias=True,
                                          rope_scaling={"rope_type": "linear", "factor": 2.0}),
    }


@pytest.mark.parametrize("variant", ["gqa-untied", "tied-mha", "llama3-rope", "linear-rope-qkv-bias"])
def test_gguf_f32_logits_match_torch(tiny_variants, variant, tmp_path):
    rec = export(tiny_variants[variant], tmp_path / "m.gguf", "--format", "gguf", "--gguf-type", "F32").record
    validate(rec)
    m = rec["metrics"]
    assert m["verified"] and m["max_abs_logit_diff"] < 1e-3 and m["tokenizer_parity"] is True
    # independently of export's own check: llama.cpp on fresh ids, past the original rope context
    model, cfg = load_model(tiny_variants[variant])
    ids = torch.randint(0, cfg.vocab_size, (100,), generator=torch.Generator().manual_seed(3)).tolist()
    rt = open_runtime(tmp_path / "m.gguf")
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    assert np.abs(rt.logits(ids) - ref).max() < 1e-3
    rt.close()


def test_llama_cpp_tokenizes_like_itera(lm, tmp_path):
    export(lm, tmp_path / "m.gguf", "--format", "gguf", "--gguf-type", "F16").record
    rt = open_runtime(tmp_path / "m.gguf")
    ours = open_runtime(lm).tokenizer
    for text in (MULTILINGUAL, MULTILINGUAL[::-1], "  leading spaces", "x"):
        assert rt.tokenizer.encode(text, add_bos=False) == ours.encode(text, add_bos=False), text
    rt.close()
    import llama_cpp

    from itera.runtime.llamacpp_backend import LlamaCppRuntime

    with LlamaCppRuntime(tmp_path / "m.gguf", threads=1) as one:  # prompts too, not every core
        assert (llama_cpp.llama_n_threads(one.llm.ctx), llama_cpp.llama_n_threads_batch(one.llm.ctx)) == (1, 1)


def _ppl(path, text, window=128, stride=64):
    rt = open_runtime(path)
    m = evaluate_text(rt, text, EvalOptions(window=window, stride=stride, bos=False, max_tokens=3000))
    rt.close()
    return m["perplexity"]


@pytest.fixture(scope="module")
def heldout_text():
    from itera.data import load_text

    return load_text("pydocs@test").text[-40_000:]


def test_gguf_perplexity_matches_torch(lm, tmp_path, heldout_text):
    export(lm, tmp_path / "f32.gguf", "--format", "gguf", "--gguf-type", "F32").record
    export(lm, tmp_path / "q8.gguf", "--format", "gguf", "--gguf-type", "Q8_0").record
    torch_ppl = _ppl(lm, heldout_text)
    assert abs(_ppl(tmp_path / "f32.gguf", heldout_text) / torch_ppl - 1) < 1e-3
    assert abs(_ppl(tmp_path / "q8.gguf", heldout_text) / torch_ppl - 1) < 1e-2


# GPTQ's Q4_0 against llama.cpp's (both every matrix Q4_0), measured on 2048 held-out tokens: mean
# KL to the F32 file 0.00278 against 0.00284 and perplexity 111.54 against 111.44 (2-core AMD EPYC);
# the embeddings and head are the same round-to-nearest Q4_0 in both files, so most of the KL is
# shared and GPTQ's lead on the layers' matrices shows as a few percent of the whole.


def test_gptq_q4_0_beats_llama_cpp_own_q4_0(lm, tmp_path, heldout_text):
    from itera.export.gguf import llama_quantize

    q = run_itera("quantize", "--model", lm, "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib",
                  "pydocs@test", "--calib-samples", "128", "--calib-seqlen", "128", "--out", tmp_path / "g4")
    ex = run_itera("export", "--format", "gguf", "--gguf-type", "Q4_0", "--out", tmp_path / "g4.gguf",
                   stdin=q.stdout).record
    # the 28 layers from GPTQ's codes; the embeddings and head quantize left in float are Q4_0 too
    assert ex["metrics"]["direct_from_codes"] == 28 and ex["metrics"]["tensor_types"] == {"F32": 9, "Q4_0": 30}
    assert ex["parent"]["command"] == "quantize"
    export(lm, tmp_path / "f32.gguf", "--format", "gguf", "--gguf-type", "F32").record
    # llama.cpp's Q4_0 with the same layout: every matrix Q4_0 (by default it keeps the head in Q8_0 here)
    llama_quantize(tmp_path / "f32.gguf", tmp_path / "llama-q4_0.gguf", "Q4_0", pure=True)
    # judged as the field judges it, in llama.cpp on held-out text: a lower mean KL to the F32 file,
    # and a perplexity no worse than llama.cpp's beyond 0.5% (it was 0.1% above on one CPU, below on
    # another: a model trained on another CPU differs, and the two files' perplexities are that close)
    ids = Tokenizer.from_dir(lm).encode(heldout_text, add_bos=False)[:2048]
    ref = llama_logp(tmp_path / "f32.gguf", ids)
    kl_ours, kl_theirs = (mean_kl(ref, llama_logp(tmp_path / f, ids)) for f in ("g4.gguf", "llama-q4_0.gguf"))
    assert kl_ours < kl_theirs, (kl_ours, kl_theirs)
    ours, theirs = _ppl(tmp_path / "g4.gguf", heldout_text), _ppl(tmp_path / "llama-q4_0.gguf", heldout_text)
    assert ours < theirs * 1.005, (ours, theirs)
    # the direct blocks hold exactly the quantized checkpoint's weights: written with the checkpoint's
    # own types (AUTO: the embeddings and head stay F16), llama.cpp agrees with torch on it
    same = export(tmp_path / "g4", tmp_path / "g4-auto.gguf", "--format", "gguf").record
    assert same["metrics"]["direct_from_codes"] == 28 and same["metrics"]["kept_f16"] == ["token_embd.weight",
                                                                                          "output.weight"]
    assert abs(_ppl(tmp_path / "g4-auto.gguf", heldout_text) / _ppl(tmp_path / "g4", heldout_text) - 1) < 2e-3


def test_llama_cpp_k_quant(lm, tmp_path):
    rec = export(lm, tmp_path / "k.gguf", "--format", "gguf", "--gguf-type", "Q4_K_M").record
    assert rec["metrics"]["quantized_by"] == "llama.cpp" and rec["metrics"]["top1_agreement"] >= 0.6
    assert (tmp_path / "k.gguf").stat().st_size < (lm / "model.safetensors").stat().st_size / 3


def test_onnx_logits_and_kv_cache_generation(lm, tmp_path, tokenizer_dir):
    rec = export(lm, tmp_path / "m.onnx", "--format", "onnx").record
    validate(rec)
    m = rec["metrics"]
    assert m["max_abs_logit_diff"] < 1e-4 and m["kv_greedy_agreement"] == 1.0
    assert (tmp_path / "m.kv.onnx").is_file() and rec["params"]["extra_outputs"] == [str(tmp_path / "m.kv.onnx")]
    # independent check on other ids and a batch of 2
    import onnxruntime as ort

    model, cfg = load_model(lm)
    x = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(5))
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(["logits"], {"input_ids": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - model(x).numpy()).max() < 1e-4
    # evaluate runs on the .onnx file with its embedded tokenizer
    ev = run_itera("evaluate", "-d", "pydocs@test", "--max-tokens", "300", stdin=json.dumps(rec)).record
    assert ev["artifact"]["format"] == "onnx" and ev["params"]["runtime"] == "onnxruntime"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_onnx_weight_quantization(lm, tmp_path, quant):
    rec = export(lm, tmp_path / "m.onnx", "--format", "onnx", "--onnx-quant", quant).record
    assert rec["metrics"]["verified"] and (tmp_path / "m.onnx").stat().st_size < (lm / "model.safetensors").stat().st_size / 2


@pytest.mark.parametrize("fmt,suffix", [("pt2", ".pt2"), ("torchscript", ".pt")])
def test_torch_formats(tiny_ckpt, tmp_path, fmt, suffix):
    rec = export(tiny_ckpt, tmp_path / f"m{suffix}", "--format", fmt).record
    assert rec["metrics"]["max_abs_logit_diff"] < 1e-4 and rec["artifact"]["format"] == fmt


def test_verification_failure_removes_the_artifact(tiny_ckpt, tmp_path):
    res = export(tiny_ckpt, tmp_path / "m.gguf", "--format", "gguf", "--gguf-type", "Q8_0", "--max-logit-diff", "1e-9")
    assert res.returncode == 1 and res.stdout == "" and "disagrees with the source model" in res.stderr
    assert list(tmp_path.iterdir()) == []
    kept = export(tiny_ckpt, tmp_path / "m.gguf", "--format", "gguf", "--gguf-type", "Q8_0", "--max-logit-diff",
                  "1e-9", "--allow-mismatch").record
    assert kept["metrics"]["verified"] is False and (tmp_path / "m.gguf").is_file()


def test_max_kl_and_min_top1_refuse_an_export_beyond_them(tiny_ckpt, tmp_path):
    """--max-kl and --min-top1 (named by ExportOptions' errors) are flags, and the record says what they held it to."""
    assert_usage_error(export(tiny_ckpt, tmp_path / "m.gguf", "--format", "gguf", "--min-top1", "1.5"),
                       "--min-top1 must be at most 1")
    assert_usage_error(export(tiny_ckpt, tmp_path / "m.gguf", "--format", "gguf", "--max-kl", "-1"),
                       "--max-kl must be a non-negative number")
    res = export(tiny_ckpt, tmp_path / "m.gguf", "--format", "gguf", "--gguf-type", "Q8_0", "--max-kl", "0")
    assert res.returncode == 1 and res.stdout == "" and "KL " in res.stderr and "> 0)" in res.stderr
    assert list(tmp_path.iterdir()) == []
    kept = export(tiny_ckpt, tmp_path / "m.gguf", "--format", "gguf", "--gguf-type", "Q8_0", "--max-kl", "0",
                  "--min-top1", "1", "--allow-mismatch").record
    assert kept["metrics"]["verified"] is False
    assert kept["metrics"]["tolerance"]["max_kl"] == 0 and kept["metrics"]["tolerance"]["min_top1_agreement"] == 1
    assert kept["params"]["max_kl"] == 0 and kept["params"]["min_top1"] == 1
    assert kept["params"]["verify_tokens"] == kept["metrics"]["verify_tokens"] == 128  # the CLI's default, as before


def test_bad_input(tiny_ckpt, tmp_path, tokenizer_dir):
    assert_usage_error(export(tiny_ckpt, tmp_path / "m.x", "--format", "tflite"), "unknown --format 'tflite'")
    assert_usage_error(export(tiny_ckpt, tmp_path / "m.gguf", "--format", "gguf", "--gguf-type", "Q9_X"),
                       "unknown --gguf-type 'Q9_X'")
    (tmp_path / "afile").write_text("x")  # a missing directory of --out is created; a file in its place is refused
    assert_usage_error(export(tiny_ckpt, tmp_path / "afile" / "m.gguf", "--format", "gguf"), "is not a directory")
    (tmp_path / "afile").unlink()
    mistral = save_tiny(tmp_path / "mistral", tokenizer_dir, model_type="mistral", sliding_window=8)
    assert_usage_error(export(mistral, tmp_path / "m.gguf", "--format", "gguf"), "sliding-window")
    notok = save_tiny(tmp_path / "notok", tokenizer_dir)
    (notok / "tokenizer.json").unlink()
    assert_usage_error(export(notok, tmp_path / "m.onnx", "--format", "onnx"), "has no tokenizer.json")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["mistral", "notok"]


def test_sentencepiece_style_tokenizer_exports_with_parity(tmp_path):
    """A SentencePiece-style BPE with byte fallback goes in as llama.cpp's `llama` tokenizer model;
    llama.cpp tokenizes text (characters outside the vocabulary included) to itera's ids."""
    from itera.data import load_text
    from itera.model.checkpoint import save_model
    from itera.model.config import ModelConfig
    from itera.model.llama import LlamaForCausalLM
    from itera.tokenizer import Tokenizer, train_sentencepiece_bpe

    tok = train_sentencepiece_bpe([load_text("pydocs@train").text[:150_000] + " Größe où ¿qué?"], 600)
    tok.save(tmp_path / "tok")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = LlamaForCausalLM(cfg)
    model.init_weights(seed=0, std=0.1)
    save_model(model, tmp_path / "spm", tokenizer_from=tmp_path / "tok")
    rec = export(tmp_path / "spm", tmp_path / "spm.gguf", "--format", "gguf", "--gguf-type", "F32").record
    assert rec["metrics"]["tokenizer_parity"] is True and rec["metrics"]["max_abs_logit_diff"] < 1e-3
    ours = Tokenizer.from_dir(tmp_path / "spm")
    rt = open_runtime(tmp_path / "spm.gguf")
    for text in (MULTILINGUAL, "  leading spaces", "a   b\n\n\n  c", "plain words only"):
        ids = ours.encode(text, add_bos=False)
        assert rt.tokenizer.encode(text, add_bos=False) == ids, text
        assert ours.decode(ids) == text
    assert any(ours.backend.id_to_token(i).startswith("<0x") for i in ours.encode("北京", add_bos=False))
    rt.close()


# ------------------------------------------------------------------------------- a real model's weights


@pytest.mark.parametrize("fmt,gguf_type", [("gguf", "F16"), ("gguf", "Q8_0"), ("gguf", "Q4_0"), ("onnx", None)])
def test_trained_model_with_large_weights_exports_without_allow_mismatch(stories, tmp_path, fmt, gguf_type):
    """Lossy types of a real model pass: the runtime is checked against the file's own weights,
    and the loss against the float source is reported, not mistaken for a runtime error."""
    args = ["--gguf-type", gguf_type] if gguf_type else []
    rec = export(stories, tmp_path / f"m.{fmt}", "--format", fmt, *args).record
    m = rec["metrics"]
    assert m["verified"] and m["problems"] == []
    assert m["runtime_vs_file"]["rel_rms"] < m["tolerance"]["runtime_vs_file_rel_rms"]
    assert m["kl_to_source"] < 0.1 and m["perplexity_export"] < m["perplexity_source"] * 1.1
    if gguf_type == "F16":
        assert m["tensor_types"] == {"F32": 7, "F16": 22}  # norms F32; FFN 172-wide rows are still whole F16 rows


@pytest.mark.parametrize("gguf_type", ["F32", "Q4_0"])
def test_a_gguf_with_q_k_rows_in_the_wrong_rope_layout_fails(stories, tmp_path, monkeypatch, gguf_type):
    """A writer that forgot llama.cpp's rope permutation makes a file llama.cpp runs wrongly: the
    runtime-against-file check catches it for a float type and a block type alike."""
    import itera.export.gguf as gguf_writer
    from itera.jobs.export import ExportOptions, VerificationError, run_export

    monkeypatch.setattr(gguf_writer, "rope_permutation", lambda n, hd: torch.arange(n * hd))
    with pytest.raises(VerificationError, match="disagrees with the file's own weights"):
        run_export(ExportOptions(model=stories, out=tmp_path / "bad.gguf", format="gguf", gguf_type=gguf_type))
    assert list(tmp_path.iterdir()) == []


def test_fallbacks_are_one_stderr_line(tiny_ckpt, tmp_path):
    """Q4_K_M on a model no row of which is a multiple of 256: every matrix falls back, and stderr
    says so in one line (count, types, a few names, how many more); the record lists each one."""
    res = export(tiny_ckpt, tmp_path / "k.gguf", "--format", "gguf", "--gguf-type", "Q4_K_M", "--allow-mismatch")
    fbs = res.record["metrics"]["fallbacks"]
    assert len(fbs) > 3
    lines = [line for line in res.stderr.splitlines() if "fell back" in line or "fallback:" in line]
    assert len(lines) == 1, res.stderr
    types = sorted({fb["written"] for fb in fbs})
    assert f"{len(fbs)} tensors fell back from Q4_K_M to " in lines[0] and all(t in lines[0] for t in types)
    assert fbs[0]["tensor"] in lines[0] and f"…and {len(fbs) - 3} more" in lines[0]
