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


def file_key(path) -> str:
    """The key a file dataset's figures have in records: its name and the first 8 hex digits of the
    sha256 of its bytes, computed here as ``sha256sum`` would, not by itera."""
    import hashlib

    path = Path(path)
    return f"{path.name}#{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}"


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
                    *SMALL, timeout=1800)
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
              "--batch-size", "16", "--seq-len", "64", "--lr", "4e-3", "--warmup-steps", "10", timeout=1800).record
    return out


@pytest.fixture(scope="session")
def wide_lm(tmp_path_factory):
    """A small model trained on natural text whose every matrix is a multiple of 256 wide (hidden
    256, FFN 512), so llama.cpp's and itera's K-quant types fit all of them; untied output head."""
    d = tmp_path_factory.mktemp("wide-lm")
    (d / "wide.yaml").write_text("layers: 2\nhidden: 256\nheads: 4\nkv_heads: 2\nffn: 512\n"
                                 "tie_word_embeddings: false\nmax_position_embeddings: 512\n")
    out = d / "wide"
    run_itera("distill", "--alpha", "0", "--tokenizer", "bpe:1024", "--student", d / "wide.yaml", "--data",
              "pydocs@train", "--out", out, "--steps", "200", "--batch-size", "16", "--seq-len", "64", "--lr", "4e-3",
              "--warmup-steps", "10", timeout=1800).record
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


# Set on a developer's or CI machine, these would change what the CLI under test does (a traceback
# instead of one line, another actor in the history, another registry); a test passes them itself.
CALLER_ONLY = ("ITERA_DEBUG", "ITERA_ACTOR", "ITERA_REGISTRY")


def clean_environ() -> dict:
    """os.environ without the settings in :data:`CALLER_ONLY`."""
    return {k: v for k, v in os.environ.items() if k not in CALLER_ONLY}


def run_itera(*args, stdin: bytes | str | None = None, env: dict | None = None, timeout: float = 600,
              cwd: Path | None = None) -> Result:
    """Run the real CLI in a subprocess (``python -m itera``), as a user's shell would."""
    if isinstance(stdin, str):
        stdin = stdin.encode()
    full_env = {**clean_environ(), **(env or {})}
    p = subprocess.run([sys.executable, "-m", "itera", *map(str, args)], input=stdin if stdin is not None else b"",
                       capture_output=True, env=full_env, timeout=timeout, cwd=cwd or REPO)
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


def llama_logp(path, ids: list[int], window: int = 256):
    """llama.cpp's log-probabilities (a float64 array, positions x vocabulary) at every position of
    consecutive windows of ``ids``."""
    import numpy as np

    from itera.runtime.llamacpp_backend import LlamaCppRuntime

    out = []
    with LlamaCppRuntime(path, threads=2) as rt:
        for i in range(0, len(ids) - window + 1, window):
            x = rt.logits(ids[i:i + window]).astype(np.float64)
            x -= x.max(-1, keepdims=True)
            out.append(x - np.log(np.exp(x).sum(-1, keepdims=True)))
    return np.concatenate(out)


def mean_kl(ref, logp) -> float:
    """Mean KL(ref || logp) over positions, from two :func:`llama_logp` arrays."""
    import numpy as np

    return float((np.exp(ref) * (ref - logp)).sum(-1).mean())


@pytest.fixture(scope="session")
def stories(tmp_path_factory):
    """A trained model shaped like llama2.c's stories260K (hidden 64, 8 heads / 4 kv heads, tied,
    FFN 172 — a width no group of 32 divides), with that family's large weight magnitudes: after
    training, each RMSNorm's gain is multiplied by 16 and the projections it feeds divided by 16,
    which leaves the function as it was and the weights and activations 16 times larger."""
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("stories")
    (d / "stories.yaml").write_text("layers: 3\nhidden: 64\nheads: 8\nkv_heads: 4\nffn: 172\n"
                                   "tie_word_embeddings: true\nmax_position_embeddings: 256\n")
    out = d / "stories"
    run_itera("distill", "--alpha", "0", "--tokenizer", "bpe:512", "--student", d / "stories.yaml",
              "--data", "pydocs@train", "--out", out, "--steps", "150", "--batch-size", "16", "--seq-len", "64",
              "--lr", "5e-3", "--warmup-steps", "10", "--weight-decay", "0", timeout=1800).record
    sd = load_file(str(out / "model.safetensors"))
    for i in range(3):
        p = f"model.layers.{i}."
        for norm, projs in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            sd[p + norm + ".weight"] = sd[p + norm + ".weight"] * 16
            for proj in projs:
                sd[p + proj + ".weight"] = sd[p + proj + ".weight"] / 16
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _placeholder(spec: dict):
    """A value of the type a schema property asks for (1 satisfies every numeric bound used there;
    nullable properties get null; objects get their required keys)."""
    if "enum" in spec:
        return spec["enum"][0]
    if "oneOf" in spec or "anyOf" in spec:
        return _placeholder((spec.get("oneOf") or spec.get("anyOf"))[-1])
    t = spec.get("type")
    t = "null" if isinstance(t, list) and "null" in t else (t[0] if isinstance(t, list) else t)
    if t == "object":
        return {k: _placeholder(spec.get("properties", {}).get(k, {})) for k in spec.get("required", [])}
    return {"integer": 1, "number": 1.0, "string": "x", "boolean": True, "array": [], "null": None}.get(t, None)


def make_record(command: str, artifact: dict | None, metrics: dict | None = None, params: dict | None = None,
                parent: dict | None = None) -> dict:
    """A record built by the real protocol (record.Run) for tests that need hand-made lineages:
    ``metrics`` and ``params`` as given, and every other key the schema requires for ``command``
    filled with a typed placeholder, so the tests say only the figures they are about."""
    from itera.record import Run, schema

    metrics, params = dict(metrics or {}), dict(params or {})
    root = schema()
    for block in root.get("allOf", []):
        cond = block.get("if", {}).get("properties", {}).get("command", {})
        if cond.get("const") != command and not (cond.get("pattern") and __import__("re").match(cond["pattern"], command)):
            continue
        thens = [block.get("then", {})]
        while thens:  # the block and the conditional blocks inside it: their keys are only added
            then = thens.pop()
            thens += [b.get("then", {}) for b in then.get("allOf", [])]
            for target, part in ((metrics, "metrics"), (params, "params")):
                for key, sub in _required(then.get("properties", {}).get(part, {}), root):
                    target.setdefault(key, _placeholder(sub))
    return Run(command, parent=parent).record(artifact, metrics, params)


def _required(spec: dict, root: dict) -> list[tuple[str, dict]]:
    """(key, its schema) for every key ``spec`` requires, through $ref and allOf."""
    if "$ref" in spec:
        node = root
        for part in spec["$ref"].lstrip("#/").split("/"):
            node = node[part]
        spec = node
    out = [(k, spec.get("properties", {}).get(k, {})) for k in spec.get("required", [])]
    for sub in spec.get("allOf", []):
        out += _required(sub, root)
    return out


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A throwaway PostgreSQL server for the session (tests/pg.py: initdb and pg_ctl into a temporary
    directory, as the ``postgres`` user when the tests run as root). Skipped when PostgreSQL is not
    installed, unless ITERA_REQUIRE_POSTGRES=1 (CI): there a suite that skips it would prove nothing."""
    from pg import PostgresServer

    ok, reason = PostgresServer.available()
    if not ok:
        if os.environ.get("ITERA_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"ITERA_REQUIRE_POSTGRES=1, and {reason}", pytrace=False)
        pytest.skip(reason)
    server = PostgresServer().start(tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres) -> str:
    """The URL (with the password) of a new, empty database on the session's PostgreSQL server."""
    return postgres.create_database()
