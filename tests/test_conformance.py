"""The families docs/formats.md names, end to end: tiny random checkpoints with each family's structure
(tests/families.py) through evaluate, quantize, export to every runtime, evaluation of each
export, distill and dpo-train; and llama.cpp used directly agreeing with `tokenizers` and
transformers on Llama-3- and Qwen2-style files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import file_key, run_itera
from families import FAMILIES, checkpoint
from itera.errors import UnsupportedModelError
from itera.jobs.evaluate import EvaluateOptions, run_evaluate
from itera.scoring import EvalOptions
from itera.jobs.export import ExportOptions, run_export
from itera.export.verify import PARITY_TEXT
from itera.jobs.quantize import QuantizeOptions, run_quantize

EXPORTS = [("gguf", "F32"), ("gguf", "F16"), ("gguf", "Q8_0"), ("gguf", "Q4_0"), ("gguf", "Q4_K_M"), ("onnx", None)]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    d = tmp_path_factory.mktemp("families")
    return {f: checkpoint(f, d) for f in FAMILIES}


def _ppl(model, text_file, **kw) -> float:
    opts = EvaluateOptions(model=model, datasets=[str(text_file)],
                           protocol=EvalOptions(window=64, stride=32, max_tokens=400, bos=False), **kw)
    return run_evaluate(opts).metrics["datasets"][file_key(text_file)]["perplexity"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_end_to_end(family, families, corpus_file, tmp_path):
    ckpt = families[family]
    torch_ppl = _ppl(ckpt, corpus_file)
    assert 1 < torch_ppl < 5000
    for method in ("rtn", "gptq"):  # default options (gptq needs calibration text)
        q = run_quantize(QuantizeOptions(model=ckpt, out=tmp_path / method, method=method,
                                         calib=str(corpus_file) if method == "gptq" else None))
        assert q.metrics["bits_per_weight"] > 4 and _ppl(tmp_path / method, corpus_file) < torch_ppl * 1.5
    for fmt, gguf_type in EXPORTS:
        out = tmp_path / f"m-{gguf_type or 'fp32'}.{fmt}"
        opts = ExportOptions(model=ckpt, out=out, format=fmt, gguf_type=gguf_type or "F16")
        if family == "mistral":  # sliding window: refused with the reason, nothing written
            with pytest.raises(UnsupportedModelError, match="sliding-window"):
                run_export(opts)
            assert not out.exists()
            continue
        m = run_export(opts).metrics
        assert m["verified"] and m["tokenizer_parity"] is True and m["tokenizer_parity_tokens"] > 300, m["problems"]
        if gguf_type in ("F32", None) or fmt == "onnx":
            ratio = _ppl(out, corpus_file) / torch_ppl
            assert abs(ratio - 1) < 1e-3, (family, gguf_type, ratio)
        elif gguf_type == "Q8_0":
            assert abs(_ppl(out, corpus_file) / torch_ppl - 1) < 0.02
    student = run_itera("distill", "--teacher", ckpt, "--student", "half", "--data", corpus_file, "--out",
                        tmp_path / "student", "--steps", "2", "--batch-size", "4", "--seq-len", "32").record
    assert student["metrics"]["student_perplexity"] > 1
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}:", "chosen": " a fine answer.",
                                         "rejected": " a poor answer."}) + "\n" for i in range(8)))
    dpo = run_itera("dpo-train", "--model", ckpt, "--pairs", pairs, "--out", tmp_path / "dpo", "--steps", "2",
                    "--batch-size", "2").record
    assert dpo["metrics"]["pairs_used"] > 0 and math.isfinite(dpo["metrics"]["final_loss"])


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_llama_cpp_agrees_with_tokenizers_and_transformers(family, families, tmp_path):
    """llama-cpp-python used directly on itera's GGUF: the same tokens as `tokenizers` for the varied
    text, and transformers' logits within 1e-3 (F32 weights, F32 KV cache)."""
    import llama_cpp
    import transformers
    from tokenizers import Tokenizer

    ckpt = families[family]
    run_itera("export", "--model", ckpt, "--format", "gguf", "--gguf-type", "F32", "--out", tmp_path / "m.gguf").record
    hf_tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    hf_tok.encode_special_tokens = True  # special-token strings in the text are text, as with parse_special off
    want = hf_tok.encode(PARITY_TEXT, add_special_tokens=False).ids
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=1024, logits_all=True, verbose=False,
                          type_k=0, type_v=0)  # 0: GGML_TYPE_F32 KV cache
    got = llm.tokenize(PARITY_TEXT.encode(), add_bos=False, special=False)
    assert got == want
    ids = want[:200]
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)])
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == ref.shape  # one logit per row of the padded table
    assert np.abs(ours - ref).max() < 1e-3
    if family == "qwen2":
        meta = llm.metadata
        assert meta["tokenizer.ggml.pre"] == "qwen2" and meta["tokenizer.ggml.add_bos_token"] == "false"
        assert "im_start" in meta["tokenizer.chat_template"]
    else:
        assert llm.metadata["tokenizer.ggml.pre"] == "llama-bpe" and llm.token_bos() == hf_tok.token_to_id(
            "<|begin_of_text|>")
    llm.close()


def test_tokenizers_llama_cpp_cannot_split_like_are_refused_at_once(tmp_path, tokenizer_dir):
    import time

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from conftest import assert_usage_error, save_tiny

    cases = {}
    for name, model in (("unigram", models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], 0)),
                        ("wordpiece", models.WordPiece({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))):
        cases[name] = Tokenizer(model)
    odd = Tokenizer(models.BPE())
    odd.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}+|\s+"), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    cases["odd-split"] = odd
    needles = {"unigram": "this one is Unigram", "wordpiece": "this one is WordPiece",
               "odd-split": "Split '\\\\p{L}+|\\\\p{N}+|\\\\s+' is not a split llama.cpp knows"}
    for name, tok in cases.items():
        ckpt = save_tiny(tmp_path / name, tokenizer_dir)
        tok.save(str(ckpt / "tokenizer.json"))
        t0 = time.perf_counter()
        res = run_itera("export", "--model", ckpt, "--format", "gguf", "--out", tmp_path / f"{name}.gguf")
        assert_usage_error(res, needles[name])
        assert time.perf_counter() - t0 < 20 and not (tmp_path / f"{name}.gguf").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_distill_quantize_evaluate_on_the_135m_shape(tmp_path, corpus_file):
    """SmolLM2-135M's shapes (random weights) through distill, GPTQ and evaluate with --device cuda."""
    from itera.model.checkpoint import save_model
    from itera.model.config import ModelConfig
    from itera.model.llama import LlamaForCausalLM
    from itera.tokenizer import train_bpe

    tok = train_bpe([corpus_file.read_text()], 1000)
    tok.save(tmp_path / "tok")
    cfg = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                      max_position_embeddings=2048, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = LlamaForCausalLM(cfg)
    model.init_weights(seed=0)
    save_model(model, tmp_path / "m", tokenizer_from=tmp_path / "tok")
    rec = run_itera("evaluate", "--model", tmp_path / "m", "-d", corpus_file, "--max-tokens", "1000",
                    "--device", "cuda").record
    assert rec["host"]["device"].startswith("cuda")
    q = run_itera("quantize", "--model", tmp_path / "m", "--method", "gptq", "--calib", corpus_file,
                  "--out", tmp_path / "q", "--device", "cuda").record
    assert q["host"]["device"].startswith("cuda") and q["metrics"]["perplexity_after"] > 1
    run_itera("distill", "--teacher", tmp_path / "m", "--student", "half", "--data", corpus_file, "--out",
              tmp_path / "s", "--steps", "5", "--device", "cuda").record
