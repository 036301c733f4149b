"""Tiny random checkpoints with the structure of the model families users bring.

Each builder trains a small tokenizer of the family's kind (its pre-tokenizer, special tokens,
BOS rule and chat template, as the real tokenizer.json and tokenizer_config.json have them) and
writes a random checkpoint with the family's architecture switches:

- ``llama2``: TinyLlama / Llama 2 — SentencePiece-style BPE with byte fallback, BOS added, GQA, untied head;
- ``llama3`` / ``llama3-tied``: Llama 3.x — regex byte-level BPE (Llama 3's Split), BOS from the
  post-processor (tokenizer_config.json does not say), llama3 rope scaling, <|eot_id|> in
  generation_config's eos list; Llama 3.2 ties the head;
- ``qwen2``: Qwen2/2.5 — Qwen2's Split (digits one by one), NFC, ChatML specials, no BOS, q/k/v bias,
  tied, the embedding table padded past the tokenizer;
- ``smollm2``: SmolLM2 — single-digit split before GPT-2's byte-level regex, tied, hidden 96 (not a
  multiple of 128, nor of a group of 64);
- ``mistral``: Mistral — SentencePiece-style BPE, sliding-window attention.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import make_corpus

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
FAMILIES = ("llama2", "llama3", "llama3-tied", "qwen2", "smollm2", "mistral")


def training_text() -> str:
    """Varied enough that merges form over words, digits, punctuation and other scripts."""
    from itera.data import load_text

    return make_corpus(400, seed=11) + "\n" + load_text("pydocs@train").text[:60_000] + \
        "\n2024-11-22 12345 3.14159 café naïve Größe Καλημέρα Привет 北京 東京 🙂 def f(x): return x\r\n"


def _byte_level(vocab: int, pre, specials: list[str], normalizer=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([training_text()], trainer=trainer)
    return tok


def _write_tokenizer(d: Path, backend, tcfg: dict, gen: dict | None = None) -> None:
    d.mkdir(parents=True, exist_ok=True)
    backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "clean_up_tokenization_spaces": False, **tcfg}, indent=2))
    if gen is not None:
        (d / "generation_config.json").write_text(json.dumps(gen, indent=2))


def tokenizer_dir(family: str, d: Path) -> Path:
    """A tokenizer directory of the family's kind."""
    from tokenizers import Regex, normalizers, pre_tokenizers, processors

    from itera.tokenizer import train_sentencepiece_bpe

    if family in ("llama2", "mistral"):
        tok = train_sentencepiece_bpe([training_text()], 500)
        tok.save(d)
        return d
    if family.startswith("llama3"):
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok = _byte_level(600, pre, specials)
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", bos)])
        # Like Llama 3's: no add_bos_token key; the post-processor puts BOS in front.
        _write_tokenizer(d, tok, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                  "chat_template": LLAMA3_CHAT},
                         {"bos_token_id": bos, "eos_token_id": [tok.token_to_id("<|end_of_text|>"),
                                                                tok.token_to_id("<|eot_id|>")]})
        return d
    if family == "qwen2":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok = _byte_level(600, pre, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], normalizers.NFC())
        _write_tokenizer(d, tok, {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                  "add_bos_token": False, "chat_template": CHATML})
        return d
    if family == "smollm2":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok = _byte_level(600, pre, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        _write_tokenizer(d, tok, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                  "add_bos_token": False, "chat_template": CHATML})
        return d
    raise ValueError(family)


def checkpoint(family: str, d: Path, seed: int = 0) -> Path:
    """A tiny random checkpoint of the family at ``d / family``."""
    import torch

    from itera.model.checkpoint import save_model
    from itera.model.config import ModelConfig
    from itera.model.llama import LlamaForCausalLM
    from itera.tokenizer import Tokenizer

    tdir = tokenizer_dir(family, d / f"{family}-tokenizer")
    tok = Tokenizer.from_dir(tdir)
    n = tok.max_id + 1
    kw = dict(vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    if family.startswith("llama3"):
        kw.update(rope_theta=500000.0, tie_word_embeddings=family == "llama3-tied",
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    elif family == "qwen2":
        # Qwen2 pads its embedding table (151,936 rows for 151,665 tokens): a multiple of 64, plus more
        kw.update(model_type="qwen2", qkv_bias=True, tie_word_embeddings=True, rope_theta=1e6,
                  vocab_size=(n + 63) // 64 * 64 + 64)
    elif family == "smollm2":
        kw.update(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, intermediate_size=256,
                  tie_word_embeddings=True)
    elif family == "mistral":
        kw.update(model_type="mistral", sliding_window=32)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(ModelConfig(**kw))
    model.init_weights(seed=seed, std=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.05)
    return save_model(model, d / family, tokenizer_from=tdir)
