"""Verification of an exported artifact, in three separate questions.

1. **Does the runtime compute what the file contains?** The artifact's runtime is run on token
   ids and compared with a reference that holds exactly the file's weights: for GGUF, the
   checkpoint's model with every tensor read back from the file and dequantized (gguf's own
   reader, :func:`itera.export.gguf.gguf_state`), q/k rows un-permuted; for float ONNX, torch.export and TorchScript, the source
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
