"""Verification of an exported artifact, in three separate questions.

1. **Does the runtime compute what the file contains?** The artifact's runtime is run on token
   ids and compared with a reference that holds exactly the file's weights: for GGUF, the
   checkpoint's model with every tensor read back from the file and dequantized (gguf's own
   reader), q/k rows un-permuted; for float ONNX, torch.export and TorchScript, the source
   weights themselves. This must agree tightly for every type: a wrong graph, rope layout or
   block layout fails, whatever the type. The tolerance is on the relative RMS difference of
   the logits (``rel_rms``). The reference rounds every matrix product's input as llama.cpp's CPU
   backend does for that weight's type (float16, or 8-bit blocks: ``itera.storage.ggml.input_as_llama_cpp``),
   which removes most of the difference; the tolerance covers the rest (summation order and
   llama.cpp's own kernels).
2. **How much did the type lose?** Against the float source on the same ids (real text, the
   held-out split of the built-in corpus): KL(source || export), top-1 agreement, both
   perplexities, max/mean |logit diff|. Gated only by the user's thresholds, or a per-type
   default that only a broken export exceeds: a legitimate F16/Q8_0/Q4_0 export is never refused.
3. **Does the runtime tokenize like itera?** A fixed, varied text is tokenized by both; any
   difference fails, naming the first differing position.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# Runtime vs the file's own weights: relative RMS logit difference. Measured on the demo teacher
# (4 layers, hidden 192) with the inputs rounded as llama.cpp rounds them / without: F16 6.1e-5 /
# 1.4e-4, Q8_0 1.0e-3 / 4.4e-3, Q4_0 1.6e-3 / 4.3e-3, Q4_K_M 1.7e-3 / 5.6e-3, Q2_K 1.2e-3 / 5.1e-3,
# an itera auto mix 3.2e-3 / 5.2e-3; a random 22-layer TinyLlama-shaped Q4_0 reached 0.040 without.
# With q/k rows left in Hugging Face's rope layout files give 0.35 (trained) / 0.074 (random).
RUNTIME_TOLERANCE = {"F32": 1e-4, "onnx": 1e-4, "pt2": 1e-4, "torchscript": 1e-4, "F16": 0.01, "BF16": 0.02}
BLOCK_TOLERANCE = 0.04
# Quality against the float source: mean KL (nats per token) beyond which only a broken export goes.
MAX_KL = {"F32": 0.01, "onnx": 0.01, "pt2": 0.01, "torchscript": 0.01, "F16": 0.05, "BF16": 0.1, "Q8_0": 0.5,
          "int8": 1.0, "Q6_K": 1.0, "Q5_K_M": 1.5, "Q5_K_S": 1.5, "Q5_0": 1.5, "Q5_1": 1.5}
DEFAULT_MAX_KL = 3.0  # 4-bit and below, and ONNX int4

PARITY_TEXT = (
    "Numbers: 0 7 42 123 2024 12345 1234567 3.14159 -0.5 1,000,000 1e-9 0x1F 007.\n"
    "Spaces:  two   three        eight\tand\ttabs\t\tdouble.\r\nWindows line\r\nend.\n\n\nBlank lines above.\n"
    "Accents: café, naïve, Größe, Ærøskøbing, señor, façade, Dvořák, Łódź.\n"
    "Greek: Καλημέρα κόσμε, αβγδε. Cyrillic: Привет, мир! CJK: 北京的秋天, 東京, 한국어 텍스트.\n"
    "Emoji: 🙂 👍🏽 👨‍👩‍👧 🇫🇷 ✨.\n"
    "Code:\ndef area(r):\n    return 3.14159 * r ** 2  # circle\n\nif x != y and z >= 10: print(f\"{x!r}\")\n"
    "Special strings as text: <s> </s> <unk> <pad> <|endoftext|> <|im_start|>user<|im_end|> "
    "<|begin_of_text|> <|eot_id|> [INST] <<SYS>>\n"
    "Apostrophes: it's, we're, they'll, I'd, don't, 'quoted', \"double\", “curly”, ‘single’ — dash… ellipsis."
)


def quality_ids(tok, max_len: int) -> list[int]:
    """Token ids of real text (the built-in corpus' held-out split), the ids every check runs on."""
    from itera.data import load_text

    return tok.encode(load_text("pydocs@test").text[:40_000], add_bos=False)[:max_len]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def quality(source: np.ndarray, got: np.ndarray, ids: list[int]) -> dict:
    """What the export lost against the float source on real text: KL, top-1, perplexities."""
    p, q = _log_softmax(source), _log_softmax(got)
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    targets = np.asarray(ids[1:])
    rows = np.arange(len(targets))
    nll_src, nll_exp = -p[rows, targets].mean(), -q[rows, targets].mean()
    return {"kl_to_source": kl, "top1_agreement": float((source.argmax(-1) == got.argmax(-1)).mean()),
            "perplexity_source": math.exp(nll_src), "perplexity_export": math.exp(nll_exp),
            "tokens": int(len(targets))}


def tokenizer_parity(ours: list[int], theirs: list[int], text: str) -> tuple[dict, str | None]:
    """Figures and, when the runtime tokenizes differently, the problem with the first differing position."""
    if ours == theirs:
        return {"match": True, "tokens": len(ours)}, None
    n = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    problem = (f"tokenizer mismatch at token {n} of {len(ours)} (itera {ours[n:n + 4]}, runtime "
               f"{theirs[n:n + 4]})")
    return {"match": False, "tokens": len(ours), "first_difference": n}, problem


# --------------------------------------------------------------------------- what a GGUF file contains


def gguf_state(path: Path, cfg, types: dict | None = None) -> dict:
    """Hugging Face-named float32 tensors of the weights a GGUF file holds: every tensor read back
    with gguf's reader, dequantized, q/k rows un-permuted. ``rope_freqs`` is left out (the model
    recomputes it from the config; a wrong one shows as a runtime difference)."""
    import gguf
    import torch

    from itera.storage.names import gguf_name, rope_permutation
    from itera.model.checkpoint import expected_shapes

    by_gguf = {gguf_name(hf): hf for hf in expected_shapes(cfg)}
    inverse = {"self_attn.q_proj": torch.argsort(rope_permutation(cfg.num_attention_heads, cfg.head_dim)),
               "self_attn.k_proj": torch.argsort(rope_permutation(cfg.num_key_value_heads, cfg.head_dim))}
    state = {}
    with open(path, "rb") as f:
        for t in gguf.GGUFReader(str(path)).tensors:
            if t.name not in by_gguf:
                continue
            hf = by_gguf[t.name]
            if types is not None:
                types[hf] = t.tensor_type.name
            # The bytes are read, not taken from the reader's memory map: the map's pages would stay
            # in this process's resident memory beside the float32 copies (for a 1.1B model, 2.2 GB
            # of F16 file on top of 4.4 GB of weights).
            f.seek(t.data_offset)
            raw = np.frombuffer(f.read(int(t.n_bytes)), dtype=t.data.dtype).reshape(t.data.shape)
            x = torch.from_numpy(np.array(gguf.quants.dequantize(raw, t.tensor_type), dtype=np.float32))
            del raw
            x = x.reshape(expected_shapes(cfg)[hf])
            module = hf.rsplit(".", 1)[0]
            perm = next((p for suffix, p in inverse.items() if module.endswith(suffix)), None)
            state[hf] = x[perm] if perm is not None else x
    return state


def gguf_tensor_types(path: Path) -> tuple[dict[str, int], float]:
    """{type: count} of the tensors a GGUF file really holds, and bits per weight over all of them."""
    import gguf

    counts: dict[str, int] = {}
    nbytes = elems = 0
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        nbytes += int(t.n_bytes)
        elems += int(t.n_elements)
    return counts, nbytes * 8 / max(elems, 1)


def file_logits_gguf(path: Path, cfg, ids: list[int]) -> np.ndarray:
    """Logits of the checkpoint's model holding exactly the GGUF file's weights, every matrix
    product's input rounded as llama.cpp rounds it for that weight's type: what is left between
    this and llama.cpp is summation order, so the check stays tight however deep the model."""
    import torch

    from itera.model.checkpoint import model_from_state
    from itera.storage.ggml import round_inputs_as_llama_cpp

    types: dict[str, str] = {}
    model = model_from_state(cfg, gguf_state(path, cfg, types), where=str(path))
    if "lm_head.weight" not in types:  # tied: the output product uses the embedding table
        types["lm_head.weight"] = types.get("model.embed_tokens.weight", "F32")
    for name, module in model.named_modules():
        wtype = types.get(f"{name}.weight")
        if isinstance(module, torch.nn.Linear) and wtype not in (None, "F32"):
            round_inputs_as_llama_cpp(module, wtype)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()
