"""The child-process side of runtime probes and smoke checks (run through
:func:`itera.runtime.isolate.call`, never in the user's process): a tiny random Llama checkpoint
with the shapes where llama.cpp repacks weights (rows a multiple of 8, a K-quant row of 256, an FFN
width of 704 that 256 does not divide), written as GGUF files by itera's own exporter, decoded by
llama.cpp with or without repacked weights; and two-second smokes of torch and onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TEXT = ("The quick brown fox jumps over the lazy dog. Numbers 0 7 42 123 and words: café, naïve, Größe. "
        "def area(r):\n    return 3.14159 * r ** 2\n")
PROMPT = "The quick brown fox jumps over 42 lazy dogs, and def area(r): return r"
SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def tiny_checkpoint(d: Path) -> Path:
    """A tiny random checkpoint under ``d/ckpt`` (made once; later calls reuse it)."""
    import torch

    from itera.model.checkpoint import save_model
    from itera.model.config import ModelConfig
    from itera.model.llama import LlamaForCausalLM
    from itera.tokenizer import train_bpe

    ckpt = Path(d) / "ckpt"
    if (ckpt / "config.json").is_file():
        return ckpt
    tok = train_bpe([TEXT * 20], vocab_size=320, min_frequency=1)
    tok_dir = Path(d) / "tokenizer"
    tok.save(tok_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                         **SHAPE))
    model.init_weights(seed=0, std=0.05)
    save_model(model, ckpt, tokenizer_from=tok_dir)
    return ckpt


def tiny_gguf(d: Path, gguf_type: str) -> Path:
    """``d/tiny-<type>.gguf``: the tiny checkpoint written as GGUF by itera (llama.cpp's quantizer
    for the K-quant mixes, as ``itera export`` does)."""
    from itera.export.gguf import DIRECT_TYPES, llama_quantize, write_gguf

    out = Path(d) / f"tiny-{gguf_type}.gguf"
    if out.is_file():
        return out
    ckpt = tiny_checkpoint(d)
    tmp = out.with_suffix(".tmp")
    if gguf_type in DIRECT_TYPES:
        write_gguf(ckpt, tmp, gguf_type)
    else:
        f16 = tiny_gguf(d, "F16")
        llama_quantize(f16, tmp, gguf_type, threads=1, log_dir=Path(d))
    tmp.replace(out)
    return out


def decode(path: Path, repack: bool, threads: int = 1) -> np.ndarray:
    """llama.cpp's logits for :data:`PROMPT`'s tokens, then for 8 greedy decode steps: the prompt
    goes through the batched (GEMM) kernels, the steps through the one-row (GEMV) ones."""
    import contextlib
    import io

    import llama_cpp

    from itera.runtime.llamacpp_mode import model_params

    with contextlib.redirect_stderr(io.StringIO()), model_params(repack):
        llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=threads,
                              n_threads_batch=threads, type_k=0, type_v=0, n_batch=64)
    try:
        ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)[:48]
        llm.eval(ids)
        rows = [np.array(llm.scores[: len(ids)], dtype=np.float32)]
        for _ in range(8):
            nxt = int(rows[-1][-1].argmax())
            llm.eval([nxt])
            rows.append(np.array(llm.scores[llm.n_tokens - 1: llm.n_tokens], dtype=np.float32))
        out = np.concatenate(rows)
    finally:
        llm.close()
    if not np.isfinite(out).all():
        raise ValueError(f"llama.cpp gave non-finite logits for {path.name}")
    return out


def build_and_decode(d: str, types: tuple[str, ...], repack: bool) -> dict:
    """Child: write the tiny files (if the directory lacks them) and decode each."""
    import llama_cpp

    controllable = hasattr(llama_cpp.llama_model_default_params(), "use_extra_bufts")
    if repack and not controllable:
        return {"controllable": False, "logits": {}}
    paths = {t: tiny_gguf(Path(d), t) for t in types}
    return {"controllable": controllable, "logits": {t: decode(p, repack) for t, p in paths.items()}}


# --------------------------------------------------------------------------- `itera env` smokes


def smoke_llama_cpp(d: str, gguf_type: str, repack: bool) -> dict:
    """Child: write the tiny file of ``gguf_type`` and decode it in the mode itera chose."""
    path = tiny_gguf(Path(d), gguf_type)
    logits = decode(path, repack)
    return {"positions": int(logits.shape[0]), "vocab": int(logits.shape[1]), "bytes": path.stat().st_size}


def smoke_torch() -> dict:
    """Child: the tiny checkpoint's forward pass in itera's torch model."""
    import tempfile

    import torch

    from itera.model.checkpoint import load_model

    with tempfile.TemporaryDirectory() as d:
        model, cfg = load_model(tiny_checkpoint(Path(d)))
        with torch.no_grad():
            logits = model(torch.arange(16)[None] % cfg.vocab_size)[0]
    if not torch.isfinite(logits).all():
        raise ValueError("torch gave non-finite logits")
    return {"positions": int(logits.shape[0]), "threads": torch.get_num_threads()}


def smoke_onnxruntime() -> dict:
    """Child: a one-node ONNX graph (MatMul) built with onnx's helpers, run by onnxruntime."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "smoke",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ones((2, 4), dtype=np.float32)
    y = sess.run(None, {"x": x})[0]
    if not np.allclose(y, x @ w):
        raise ValueError("onnxruntime's MatMul disagrees with numpy")
    return {"providers": sess.get_providers()}
