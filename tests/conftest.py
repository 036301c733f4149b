"""Shared fixtures: generated text, a tokenizer trained on it, tiny random checkpoints, and a CLI runner.

Nothing is downloaded: every model and text here is made by the test session.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_NOUNS = "cat dog bird fox owl horse robot child teacher farmer river garden castle ship lamp".split()
_ADJS = "small quiet bright old brave green sleepy clever happy tall red lonely".split()
_VERBS = "sees finds follows helps paints carries watches greets remembers builds".split()
_PLACES = "near the river|in the garden|under the bridge|at the castle|on the hill|by the sea".split("|")


def make_corpus(n_sentences: int, seed: int = 0) -> str:
    """Deterministic English-like text with learnable structure (grammar + word statistics)."""
    rng = random.Random(seed)
    out = []
    for i in range(n_sentences):
        s = (f"The {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the "
             f"{rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_PLACES)}.")
        out.append(s)
        if i % 7 == 6:
            out.append("\n\n")
    return " ".join(out)


@pytest.fixture(scope="session", autouse=True)
def _itera_home(tmp_path_factory):
    """Keep the tests' ITERA_HOME (caches, registry) out of the user's home."""
    home = tmp_path_factory.mktemp("itera-home")
    os.environ["ITERA_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield home


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(make_corpus(600, seed=1), encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_file) -> Path:
    from itera.tokenizer import train_bpe

    tok = train_bpe([corpus_file.read_text()], vocab_size=300)
    d = tmp_path_factory.mktemp("tokenizer")
    tok.save(d)
    return d


def save_tiny(path: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random itera checkpoint with the test tokenizer."""
    import torch

    from itera.model.checkpoint import save_model
    from itera.model.config import ModelConfig
    from itera.model.llama import LlamaForCausalLM
    from itera.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir)
    kw = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(ModelConfig(**kw))
    model.init_weights(seed=seed, std=0.1)
    return save_model(model, path, tokenizer_from=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tokenizer_dir) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer_dir)


SMALL = ["--batch-size", "8", "--seq-len", "48", "--lr", "3e-3", "--warmup-steps", "5"]


@pytest.fixture(scope="session")
def distill_corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("distill") / "stories.txt"
    p.write_text(make_corpus(2500, seed=5))
    return p


@pytest.fixture(scope="session")
def teacher(tmp_path_factory, distill_corpus):
    """A teacher trained from scratch by the CLI itself (the --alpha 0 --tokenizer bpe:N path)."""
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    res = run_itera("distill", "--alpha", "0", "--tokenizer", "bpe:400", "--layers", "4", "--hidden", "128",
                    "--heads", "4", "--kv-heads", "2", "--ffn", "384", "--data", distill_corpus, "--out", out, "--steps", "150",
                    *SMALL)
    rec = res.record
    from itera.record import validate

    validate(rec)
    m = rec["metrics"]
    assert m["student_perplexity"] < m["init_student_perplexity"] / 5  # it learned the grammar
    assert "teacher_perplexity" not in m and rec["params"]["init"] == "random"
    return out



@pytest.fixture(scope="session")
def lm(tmp_path_factory):
    """A small model trained on natural text (the built-in corpus), where 4-bit rounding costs
    measurable perplexity; the synthetic-grammar teacher is too easy to show it."""
    out = tmp_path_factory.mktemp("pydocs-lm") / "lm"
    run_itera("distill", "--alpha", "0", "--tokenizer", "bpe:1024", "--layers", "4", "--hidden", "128", "--heads", "4",
              "--kv-heads", "2", "--ffn", "384", "--data", "pydocs@train", "--out", out, "--steps", "300",
              "--batch-size", "16", "--seq-len", "64", "--lr", "4e-3", "--warmup-steps", "10").record
    return out


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def record(self) -> dict:
        assert self.returncode == 0, self.stderr
        lines = self.stdout.splitlines()
        assert len(lines) == 1, f"expected one record line on stdout, got {len(lines)}"
        return json.loads(lines[0])


def run_itera(*args, stdin: bytes | str | None = None, env: dict | None = None, timeout: float = 600) -> Result:
    """Run the real CLI in a subprocess (``python -m itera``), as a user's shell would."""
    if isinstance(stdin, str):
        stdin = stdin.encode()
    full_env = {**os.environ, **(env or {})}
    full_env.pop("ITERA_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "itera", *map(str, args)], input=stdin if stdin is not None else b"",
                       capture_output=True, env=full_env, timeout=timeout, cwd=REPO)
    return Result(p.returncode, p.stdout.decode(), p.stderr.decode())


def assert_usage_error(res: Result, *needles: str) -> str:
    """Exit 2, empty stdout, exactly one line on stderr, no traceback; the line contains each needle."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
