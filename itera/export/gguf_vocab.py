"""The tokenizer inside a GGUF file, as llama.cpp expects it.

Two tokenizer models: byte-level BPE (``tokenizer.ggml.model = gpt2``) and SentencePiece-style
BPE with byte fallback (``llama``). For byte-level BPE, llama.cpp re-implements the
pre-tokenizer's split by name (``tokenizer.ggml.pre``), so the name must be the one whose
regexes match the tokenizer.json: :func:`pre_tokenizer_name` recognises the structures of the
families itera supports (GPT-2's own split; Llama 3's and Qwen2's Split regexes; SmolLM's
single-digit split before GPT-2's) and refuses any other with one line naming it. The names and
regexes come from llama.cpp's ``llama-vocab.cpp`` and its Hugging Face converter.

Token types: added special tokens are CONTROL, other added tokens USER_DEFINED, SentencePiece's
``<0xXX>`` byte tokens BYTE, ``<unk>`` UNKNOWN. When the embedding table has more rows than the
tokenizer has tokens (Qwen2: 151,936 rows for 151,665 tokens; fine-tunes padded to a multiple of
64), the missing ids are written as ``[PAD<id>]`` tokens of type UNUSED, as llama.cpp's own
converter does, so the file has one token per row.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from itera.errors import UnsupportedModelError

BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")

# tokenizer.json Split regexes (as Hugging Face writes them) -> llama.cpp's pre-tokenizer name
SPLIT_REGEXES = {
    # Llama 3.x, DeepSeek-R1-Distill-Llama, Falcon 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    # Qwen2 / Qwen2.5: digits one at a time
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}
KNOWN = "GPT-2's byte-level split, Llama 3's or Qwen2's Split regex, or SmolLM's digits + byte-level split"


def _steps(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    return list(pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]


def _describe(step: dict) -> str:
    if step.get("type") == "Split":
        pattern = step.get("pattern") or {}
        return f"Split {pattern.get('Regex') or pattern.get('String')!r}"
    return json.dumps(step, sort_keys=True)


def pre_tokenizer_name(tj: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer.json; refuses what
    llama.cpp would split differently."""
    steps = _steps(tj.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    norm = tj.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise UnsupportedModelError(f"GGUF export: the tokenizer's normalizer {norm.get('type')} is not one "
                                    "llama.cpp applies; only none or NFC can be exported")
    if not kinds or kinds[-1] != "ByteLevel" or steps[-1].get("add_prefix_space"):
        raise UnsupportedModelError(f"GGUF export: byte-level BPE needs a ByteLevel pre-tokenizer without "
                                    f"add_prefix_space last; this one is {[_describe(s) for s in steps]}")
    byte_level = steps[-1]
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if regex in SPLIT_REGEXES and split.get("behavior") == "Isolated" and not split.get("invert"):
            return SPLIT_REGEXES[regex]
        raise UnsupportedModelError(f"GGUF export: the pre-tokenizer {_describe(split)} is not a split llama.cpp "
                                    f"knows ({KNOWN}); llama.cpp would tokenize text differently")
    raise UnsupportedModelError(f"GGUF export: the pre-tokenizer {[_describe(s) for s in steps]} is not one "
                                f"llama.cpp knows ({KNOWN})")


def check_tokenizer(ckpt: Path) -> dict:
    """Read tokenizer.json and refuse, before any work, what a GGUF cannot carry. Returns it."""
    tj = json.loads((Path(ckpt) / "tokenizer.json").read_text("utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')} "
                                    "(Unigram and WordPiece have no llama.cpp tokenizer model here)")
    if not model.get("byte_fallback"):
        pre_tokenizer_name(tj)
    return tj


def _special_id(tok, cfg, key: str) -> int | None:
    """An id from tokenizer_config.json's ``<key>`` token, else config.json's ``<key>_id``."""
    entry = tok.config.get(key)
    content = entry.get("content") if isinstance(entry, dict) else entry
    if isinstance(content, str) and tok.backend.token_to_id(content) is not None:
        return tok.backend.token_to_id(content)
    v = cfg.extra.get(f"{key}_id") if key not in ("bos_token", "eos_token", "pad_token") else \
        getattr(cfg, f"{key}_id", None)
    v = v[0] if isinstance(v, list) and v else v
    return v if isinstance(v, int) and 0 <= v < cfg.vocab_size else None


def write_vocab(w, ckpt: Path, tok, cfg) -> dict:
    """Embed the tokenizer of ``ckpt`` (tokenizer.json already checked) into GGUF writer ``w``.
    Returns what was written: model, pre-tokenizer, tokens, padding tokens."""
    import gguf

    tj = check_tokenizer(ckpt)
    model = tj["model"]
    spm = bool(model.get("byte_fallback"))
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    n = max(cfg.vocab_size, max(vocab.values()) + 1)
    tokens: list[str | None] = [None] * n
    for text, i in vocab.items():
        tokens[i] = text
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    padding = [i for i, t in enumerate(tokens) if t is None]
    for i in padding:
        tokens[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    types = []
    for i, t in enumerate(tokens):
        if i in padding:
            types.append(gguf.TokenType.UNUSED)
        elif added.get(i, {}).get("special"):
            types.append(gguf.TokenType.CONTROL)
        elif spm and t == model.get("unk_token"):
            types.append(gguf.TokenType.UNKNOWN)
        elif spm and BYTE_TOKEN.match(t):
            types.append(gguf.TokenType.BYTE)
        elif i in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    if spm:
        # SPM scores are minus the rank of the merge that made each token, so llama.cpp's
        # highest-score-first merging replays the BPE merge order.
        rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(merges)))}
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores([-float(rank[t]) if t in rank else 0.0 for t in tokens])
        w.add_token_types(types)
        w.add_add_space_prefix(True)
        unk = model.get("unk_token")
        if unk is not None and unk in vocab:
            w.add_unk_token_id(vocab[unk])
        pre = "default"
    else:
        pre = pre_tokenizer_name(tj)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    _special_tokens(w, tok, cfg)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    return {"tokenizer_model": "llama" if spm else "gpt2", "pre_tokenizer": pre, "tokens": n,
            "padding_tokens": len(padding)}


def _special_tokens(w, tok, cfg) -> None:
    """BOS/EOS/PAD/EOT ids and whether BOS/EOS are added, from tokenizer_config.json,
    generation_config.json and config.json."""
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        w.add_eos_token_id(tok.eos_id)
    pad = _special_id(tok, cfg, "pad_token")
    if pad is not None:
        w.add_pad_token_id(pad)
    eot = next((i for i in tok.stop_ids if i != tok.eos_id), None)  # e.g. Llama 3's <|eot_id|>
    if eot is not None:
        w.add_eot_token_id(eot)
    w.add_add_bos_token(bool(tok.add_bos))
    w.add_add_eos_token(bool(tok.config.get("add_eos_token", False)))
