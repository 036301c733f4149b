from __future__ import annotations

import json

import pytest

from itera.tokenizer import Tokenizer, train_bpe


def test_trained_bpe_round_trips_and_saves(tmp_path, corpus_file):
    tok = train_bpe([corpus_file.read_text()], vocab_size=300)
    text = "The brave fox sees the ship — naïve café! 123"
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text  # byte-level: any UTF-8 survives
    assert tok.encode(text)[0] == tok.bos_id and tok.encode(text)[1:] == ids
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.encode(text) == tok.encode(text) and again.bos_id == tok.bos_id and again.eos_id == tok.eos_id
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<s>" and cfg["add_bos_token"] is True


def test_transformers_tokenizer_agrees(tokenizer_dir, corpus_file):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_dir(tokenizer_dir)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    text = corpus_file.read_text()[:2000]
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text, add_bos=False)
    assert theirs.bos_token_id == ours.bos_id


def test_bos_from_config_json_when_tokenizer_config_is_silent(tmp_path, tokenizer_dir):
    import shutil

    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 2]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_id == 0 and tok.eos_id == 1 and tok.add_bos is False
