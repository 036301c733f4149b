"""Tokenizers through the `tokenizers` library (``tokenizer.json``).

BOS/EOS come from ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``add_bos_token``),
falling back to ``config.json``'s ``bos_token_id``/``eos_token_id``; when tokenizer_config.json
does not say whether BOS goes in front, the post-processor does (Llama 3 adds
``<|begin_of_text|>`` there). Text is encoded with special-token strings as plain text: data
that happens to contain ``<|im_start|>`` is not a control token (llama.cpp's ``parse_special``
off does the same); :meth:`Tokenizer.encode` with ``special=True`` parses them, for chat
templates. :func:`train_bpe` trains the byte-level BPE used by the demo and the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from itera.errors import CheckpointError

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def _token_content(tok) -> str | None:
    if isinstance(tok, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        return tok.get("content")
    return tok


@dataclass
class Tokenizer:
    backend: object  # tokenizers.Tokenizer
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False
    config: dict = field(default_factory=dict)  # tokenizer_config.json as read
    stop_ids: tuple[int, ...] = ()  # every id that ends generation (EOS, generation_config's eos list)

    def __post_init__(self) -> None:
        self.backend.encode_special_tokens = True  # special-token strings in text are text
        self._special_backend = None

    @property
    def chat_template(self) -> str | list | None:
        """tokenizer_config.json's chat_template (a Jinja string, or a list of named templates)."""
        return self.config.get("chat_template")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def max_id(self) -> int:
        """The largest token id the tokenizer can produce."""
        return max(self.backend.get_vocab(with_added_tokens=True).values())

    def check_fits(self, vocab_size: int, where: str) -> None:
        """Every id must have a row in the embedding table; fewer tokens than rows is fine
        (embedding tables padded to a multiple of 64, Qwen2's 151,936 rows for 151,665 tokens)."""
        if self.max_id >= vocab_size:
            raise CheckpointError(f"{where}: the tokenizer has ids up to {self.max_id} but the embedding table has "
                                  f"{vocab_size} rows (config vocab_size); the tokenizer does not belong to these weights")

    def encode(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of ``text`` without the tokenizer's own special-token template;
        BOS is put in front when ``add_bos`` (default: the tokenizer's setting). With
        ``special``, special-token strings in ``text`` become their tokens (rendered chat templates)."""
        backend = self.backend
        if special:
            if self._special_backend is None:
                from tokenizers import Tokenizer as HFTokenizer

                self._special_backend = HFTokenizer.from_str(self.backend.to_str())
                self._special_backend.encode_special_tokens = False
            backend = self._special_backend
        ids = backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos):
            if self.bos_id is None:
                raise CheckpointError("the tokenizer has no BOS token; pass --no-bos")
            ids = [self.bos_id] + ids
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    @classmethod
    def from_path(cls, path: Path) -> "Tokenizer":
        """A tokenizer.json file (settings from a tokenizer_config.json beside it) or a directory."""
        path = Path(path)
        if path.is_dir():
            return cls.from_dir(path)
        from itera.fsio import check_input_file

        check_input_file(path, "tokenizer", "pass a tokenizer.json or a directory holding one", CheckpointError)
        return cls.from_dir(path.parent, tokenizer_file=path)

    @classmethod
    def from_dir(cls, path: Path, tokenizer_file: Path | None = None) -> "Tokenizer":
        path = Path(path)
        tj = tokenizer_file or path / "tokenizer.json"
        if not tj.is_file():
            raise CheckpointError(f"{path} has no tokenizer.json; copy the model's tokenizer.json into the directory")
        try:
            text = tj.read_text("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{tj} is not UTF-8 text; restore the model's tokenizer.json") from None
        return cls.from_strings(text, _read_json(path / "tokenizer_config.json"), _read_json(path / "config.json"),
                                source=str(tj), gen=_read_json(path / "generation_config.json"))

    @classmethod
    def from_strings(cls, tokenizer_json: str, tcfg: dict, mcfg: dict | None = None,
                     source: str = "tokenizer.json", gen: dict | None = None) -> "Tokenizer":
        """A tokenizer from the text of a tokenizer.json and the parsed tokenizer_config.json (and
        config.json and generation_config.json for special ids); ``source`` names where they came
        from in messages."""
        from tokenizers import Tokenizer as HFTokenizer

        mcfg = mcfg or {}
        try:
            backend = HFTokenizer.from_str(tokenizer_json)
        except Exception as e:
            raise CheckpointError(f"{source} could not be loaded by the tokenizers library: "
                                  f"{' '.join(str(e).split())[:200]}") from None

        def token_id(key: str) -> int | None:
            content = _token_content(tcfg.get(key))
            if content is not None and backend.token_to_id(content) is not None:
                return backend.token_to_id(content)
            v = mcfg.get(f"{key}_id")
            v = v[0] if isinstance(v, list) and v else v
            # an id that is not a token of this tokenizer is no BOS/EOS at all
            return v if isinstance(v, int) and not isinstance(v, bool) and backend.id_to_token(v) is not None else None

        bos, eos = token_id("bos_token"), token_id("eos_token")
        add_bos = tcfg.get("add_bos_token")
        if add_bos is None:  # tokenizer_config.json is silent: the post-processor's template decides
            add_bos = _post_processor_adds(json.loads(tokenizer_json), bos, backend)
        stops = [eos] + _ids(mcfg.get("eos_token_id")) + _ids((gen or {}).get("eos_token_id"))
        stops = tuple(dict.fromkeys(i for i in stops if isinstance(i, int) and backend.id_to_token(i) is not None))
        return cls(backend, bos_id=bos, eos_id=eos, add_bos=bool(add_bos) and bos is not None, config=dict(tcfg),
                   stop_ids=stops)

    def save(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        cfg = {
            **self.config,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.backend.id_to_token(self.bos_id) if self.bos_id is not None else None,
            "eos_token": self.backend.id_to_token(self.eos_id) if self.eos_id is not None else None,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _ids(v) -> list[int]:
    return [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, int) and not isinstance(x, bool)]


def _post_processor_adds(tj: dict, bos: int | None, backend) -> bool:
    """Whether tokenizer.json's post-processor puts BOS in front of a single sequence."""
    if bos is None:
        return False
    pp = tj.get("post_processor") or {}
    steps = pp.get("processors", [pp]) if pp.get("type") == "Sequence" else [pp]
    bos_text = backend.id_to_token(bos)
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            first = single[0] if single else {}
            return "SpecialToken" in first and first["SpecialToken"].get("id") == bos_text
    return False


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    return d if isinstance(d, dict) else {}


def train_bpe(texts: Iterable[str], vocab_size: int, add_bos: bool = True, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization) with ``<s>``, ``</s>``, ``<pad>``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, bos_id=tok.token_to_id(BOS), eos_id=tok.token_to_id(EOS), add_bos=add_bos)


def train_sentencepiece_bpe(texts: Iterable[str], vocab_size: int, add_bos: bool = True) -> Tokenizer:
    """Train a SentencePiece-style BPE (Llama-2 style): words marked with a leading ``▁``, byte
    fallback to ``<0xXX>`` tokens for characters outside the vocabulary, ``<unk>``, ``<s>``, ``</s>``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", BOS, EOS, *byte_tokens],
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # Trained on words; applied like SentencePiece (and Llama-2's tokenizer.json): spaces become ▁
    # and one ▁ is put in front, with no splitting, so runs of spaces tokenize as SentencePiece does.
    from tokenizers import normalizers

    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    return Tokenizer(tok, bos_id=tok.token_to_id(BOS), eos_id=tok.token_to_id(EOS), add_bos=add_bos)


# ASCII prose, digits and code: text every correct implementation of a vocabulary (the Hugging Face
# tokenizer, llama.cpp's of the GGUF made from it) splits alike, and two vocabularies rarely do
FINGERPRINT_PROBE = ("The quick brown fox jumps over the lazy dog. In 1984, 42 cats (and 7 dogs) ate 3.14 pies; "
                     "def f(x): return x * 2 + 1  # ok?\n\tA tab, two  spaces, and UPPER-case words!")


def fingerprint(tok) -> str:
    """A short digest of how ``tok`` (this module's Tokenizer, or a runtime's) splits a fixed probe
    text, and its BOS/EOS ids: the same for a checkpoint and the GGUF exported from it, different
    for another vocabulary. The feedback store keeps it per response so that ``dpo-train`` can
    refuse feedback another tokenizer's model produced."""
    import hashlib

    ids = tok.encode(FINGERPRINT_PROBE, add_bos=False)
    blob = json.dumps({"ids": list(ids), "bos": tok.bos_id, "eos": tok.eos_id})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
