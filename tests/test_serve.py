"""itera serve: decoding in the runtime layer, then real servers (``python -m itera serve`` in a
subprocess) answering httpx and the official openai client: texts equal to greedy generation
through itera's runtimes, strict errors, auth, overload, feedback into dpo-train and PEFT, hot
swap on promote with a tampered version refused, SIGTERM drain and kill -9 durability."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, assert_usage_error, run_itera, save_tiny
from itera.runtime.base import greedy
from itera.runtime.sampling import Detokenizer, Generation, Sampler, SamplingParams, StopStrings

httpx = pytest.importorskip("httpx")  # test extra; a missing one is reported as a skip with this reason
openai = pytest.importorskip("openai")

# role: content lines; a conversation must not start with the assistant (the template says so itself)
TEMPLATE = ("{{ bos_token }}{% if messages[0]['role'] == 'assistant' %}"
            "{{ raise_exception('a conversation starts with a system or user message') }}{% endif %}"
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPT = "The old fox sees the red owl"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who sees the owl?"}]


# --------------------------------------------------------------------------- fixtures: models


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_ckpt, tokenizer_dir):
    """A checkpoint with a chat template, its GGUF (template in tokenizer.chat_template, set with
    gguf's own tool so the test does not depend on what the exporter copies) and its ONNX; a
    second model for hot swap; the plain tiny checkpoint (no template)."""
    d = tmp_path_factory.mktemp("serve-models")
    chat = d / "chat"
    shutil.copytree(tiny_ckpt, chat)
    cfg = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}, indent=2))
    run_itera("export", "--model", chat, "--format", "gguf", "--gguf-type", "F32", "--out", d / "raw.gguf").record
    p = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(d / "raw.gguf"),
                        str(d / "chat.gguf"), "--chat-template-config", str(chat / "tokenizer_config.json"), "--force"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    run_itera("export", "--model", chat, "--format", "onnx", "--out", d / "chat.onnx").record
    other = save_tiny(d / "other", tokenizer_dir, seed=7)
    run_itera("export", "--model", other, "--format", "gguf", "--gguf-type", "F32", "--out", d / "other.gguf").record
    return {"dir": d, "ckpt": chat, "gguf": d / "chat.gguf", "onnx": d / "chat.onnx", "other_gguf": d / "other.gguf",
            "plain": tiny_ckpt}


class Runtimes:
    """itera's own runtimes in this process, for reference generations."""

    def __init__(self):
        self.open = {}

    def get(self, path: Path):
        from itera.runtime import open_runtime

        if path not in self.open:
            self.open[path] = open_runtime(path, threads=1)
        return self.open[path]

    def greedy(self, path: Path, ids: list[int], n: int) -> tuple[str, int]:
        """Greedy text of n tokens after ids (cut at EOS), through the runtime's stepper."""
        rt = self.get(path)
        out = greedy(rt.stepper(), ids, n)
        if rt.tokenizer.eos_id in out:
            out = out[: out.index(rt.tokenizer.eos_id)]
        return rt.tokenizer.decode(out), len(out)

    def close(self):
        for rt in self.open.values():
            rt.close()


@pytest.fixture(scope="module")
def ref():
    r = Runtimes()
    yield r
    r.close()


def chat_prompt_ids(rt, messages, tokenizer_json: Path) -> list[int]:
    """The chat prompt as transformers renders it (an implementation independent of itera's), tokenized
    by the runtime's tokenizer with special-token strings parsed."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(tokenizer_json)), bos_token="<s>",
                                  eos_token="</s>")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=TEMPLATE)
    if hasattr(rt.tokenizer, "llm"):
        return rt.tokenizer.llm.tokenize(text.encode(), add_bos=False, special=True)
    return rt.tokenizer.encode(text, add_bos=False, special=True)


# --------------------------------------------------------------------------- fixtures: servers


class Served:
    """``python -m itera serve ... --port 0`` in a subprocess; the URL comes from its stderr line."""

    def __init__(self, *args, env: dict | None = None):
        full_env = {**os.environ, **(env or {})}
        full_env.pop("ITERA_DEBUG", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "itera", "serve", "--port", "0", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=full_env)
        self.err: list[str] = []
        self.out: list[str] = []
        self._readers = [threading.Thread(target=self._drain, args=(self.proc.stderr, self.err), daemon=True),
                         threading.Thread(target=self._drain, args=(self.proc.stdout, self.out), daemon=True)]
        for t in self._readers:
            t.start()
        self.url = self._wait_url(timeout=180)

    @staticmethod
    def _drain(stream, lines):
        for raw in iter(stream.readline, b""):
            lines.append(raw.decode("utf-8", "replace"))

    def _wait_url(self, timeout: float) -> str:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for line in list(self.err):
                m = re.search(r" on (http://[^;\s]+);", line)
                if m:
                    return m.group(1)
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise AssertionError(f"itera serve exited with {self.proc.returncode}: {''.join(self.err)[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"itera serve did not start within {timeout} s: {''.join(self.err)[-3000:]}")

    def client(self, key: str | None = None, timeout: float = 120):
        return httpx.Client(base_url=self.url, timeout=timeout,
                            headers={"Authorization": f"Bearer {key}"} if key else {})

    def openai(self, key: str = "unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, sig=signal.SIGTERM, timeout: float = 120) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        for t in self._readers:
            t.join(timeout=10)
        return rc, "".join(self.out), "".join(self.err)


@pytest.fixture(scope="module")
def main_server(models, tmp_path_factory):
    db = tmp_path_factory.mktemp("serve-main") / "feedback.db"
    s = Served("--model", models["gguf"], "--feedback-db", db, "--max-concurrency", "2", "--max-queue", "2")
    s.db = db
    yield s
    s.stop()


def _error(res, status: int, param: str | None, code: str | None = None) -> dict:
    """A JSON error in OpenAI's shape, with this status and naming this field."""
    assert res.status_code == status, (res.status_code, res.text)
    assert res.headers["content-type"].startswith("application/json")
    err = res.json()["error"]
    assert err["param"] == param, err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# --------------------------------------------------------------------------- decoding, in process


def test_stepper_logits_are_the_runtimes_logits_in_every_backend(models, ref):
    """prefill_logits/step_logits give the last row of a full forward pass; greedy is their argmax;
    two steppers on one runtime keep separate caches (torch, onnxruntime)."""
    for path, tol in ((models["ckpt"], 1e-4), (models["onnx"], 1e-4), (models["gguf"], 1e-3)):
        rt = ref.get(path)
        ids = rt.tokenizer.encode(PROMPT)
        st = rt.stepper()
        first = st.prefill_logits(ids)
        assert first.shape == (rt.logits(ids).shape[1],) and first.dtype == np.float32
        assert np.abs(first - rt.logits(ids)[-1]).max() < tol, path
        tok = int(np.argmax(first))
        nxt = st.step_logits(tok)
        assert np.abs(nxt - rt.logits(ids + [tok])[-1]).max() < tol, path
        manual, x = [], list(ids)
        for _ in range(6):
            manual.append(int(np.argmax(rt.logits(x)[-1])))
            x.append(manual[-1])
        assert greedy(rt.stepper(), ids, 6) == manual, path
        if not rt.steppers_share_state:
            a, b = rt.stepper(), rt.stepper()
            ta, tb = a.prefill(ids), b.prefill(ids[:3])
            assert a.step(ta) == manual[1] and tb == int(np.argmax(rt.logits(ids[:3])[-1]))


def test_a_stream_that_fails_after_its_200_counts_as_a_server_error():
    """A stream's status is sent before its generation ends: a failure after that is sent as an
    error event, and counted in stream_errors (and server_errors), not lost behind the 200."""
    import asyncio
    import threading
    import types

    from itera.jobs.serve import routes
    from itera.jobs.serve.metrics import Metrics

    logs: list[str] = []
    server = types.SimpleNamespace(stream_errors=0, metrics=Metrics(), log=logs.append)
    job = types.SimpleNamespace(id="cmpl-1", endpoint="completion", cancel=threading.Event())

    async def run():
        loop = asyncio.get_running_loop()
        fut, watcher = loop.create_future(), loop.create_future()
        fut.set_exception(RuntimeError("the runtime broke"))
        q: asyncio.Queue = asyncio.Queue()
        q.put_nowait(("text", "Once"))
        q.put_nowait(("done", fut))
        base = {"id": job.id, "object": "text_completion", "created": 0, "model": "m"}
        return [e async for e in routes._events(server, job, base, q, watcher, False)]

    events = asyncio.run(run())
    assert len(events) == 2 and '"Once"' in str(events[0]) and "generation failed (RuntimeError)" in str(events[1])
    assert server.stream_errors == 1 and job.cancel.is_set()
    assert "itera_stream_errors_total 1.0" in server.metrics.render()[0].decode()
    assert logs == ["serve: generation cmpl-1 failed: RuntimeError: the runtime broke"]


def test_sampler_draws_from_softmax_and_the_top_p_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    s = Sampler(temperature=1.0, seed=0)
    counts = np.bincount([s(logits) for _ in range(20000)], minlength=4) / 20000
    assert np.abs(counts - [0.5, 0.3, 0.15, 0.05]).max() < 0.015
    nucleus = Sampler(temperature=1.0, top_p=0.75, seed=0)  # {0, 1} reach 0.8 >= 0.75; 0.5 alone does not
    assert np.allclose(nucleus.probabilities(logits), [0.625, 0.375, 0, 0])
    assert set(nucleus(logits) for _ in range(500)) == {0, 1}
    hot = Sampler(temperature=2.0, seed=0).probabilities(logits)
    assert np.allclose(hot, np.sqrt([0.5, 0.3, 0.15, 0.05]) / np.sqrt([0.5, 0.3, 0.15, 0.05]).sum())
    assert Sampler(temperature=0.0)(logits) == 0

    def draws(seed):
        sm = Sampler(1.0, 1.0, seed)
        return [sm(logits) for _ in range(30)]

    assert draws(3) == draws(3) and draws(3) != draws(4)
    with pytest.raises(Exception, match="temperature"):
        SamplingParams(temperature=3.0)
    with pytest.raises(Exception, match="stop"):
        SamplingParams(stop=["a", ""])


def test_stop_strings_cut_and_hold_back_partial_matches():
    s = StopStrings(["END", "\n\n"])
    assert s.feed("abc E") == "abc "  # "E" may start END
    assert s.feed("N") == ""  # "EN" still may
    assert s.feed("X more") == "ENX more"
    assert s.feed(" fin\n") == " fin"
    assert s.feed("\nignored") == "" and s.hit and s.matched == "\n\n"
    assert s.feed("more") == "" and s.flush() == ""
    t = StopStrings(["END"])
    assert t.feed("tail E") == "tail " and t.flush() == "E" and t.matched is None
    # two stop strings in one delta: the earlier one ends the text; at one place, the longer
    u = StopStrings([".", "\n\n", "\n"])
    assert u.feed("one\n\ntwo. three") == "one" and u.matched == "\n\n"


@pytest.mark.parametrize("backend", ["tokenizers", "llama.cpp"])
def test_streamed_text_never_splits_a_character(models, ref, backend):
    """Byte-level BPE splits é, 日本 and 🦊 into byte tokens; the detokenizer releases each character
    whole, and the deltas add up to decode(all ids), also for invalid byte runs."""
    rt = ref.get(models["ckpt"] if backend == "tokenizers" else models["gguf"])
    tok = rt.tokenizer
    text = "Le café est près du 日本の川 🦊 owl."
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > len(text.encode("utf-8")) // 2  # several characters span several tokens
    d, parts = Detokenizer(tok.decode), []
    for i in ids:
        parts.append(d.push(i))
    parts.append(d.flush())
    assert "".join(parts) == text and not any("\ufffd" in p for p in parts)
    assert max(len(p.encode()) for p in parts) <= 8  # streamed in small pieces, not held to the end
    rng = np.random.default_rng(0)
    for _ in range(20):  # random ids: invalid UTF-8 included
        rand = rng.integers(3, tok.vocab_size if backend == "tokenizers" else rt.llm.n_vocab(), 25).tolist()
        d = Detokenizer(tok.decode)
        assert "".join([d.push(i) for i in rand] + [d.flush()]) == tok.decode(rand)


def test_generation_greedy_equals_runtime_greedy_and_stops(models, ref):
    rt = ref.get(models["gguf"])
    ids = rt.tokenizer.encode(PROMPT)
    want, n = ref.greedy(models["gguf"], ids, 20)
    g = Generation(rt.stepper(), rt.tokenizer.decode, ids, SamplingParams(max_tokens=20, temperature=0.0),
                   frozenset({rt.tokenizer.eos_id}))
    assert "".join(g) == want == g.text and g.finish_reason == "length" and len(g.tokens) == n == 20
    stop = want[6:9]
    g = Generation(rt.stepper(), rt.tokenizer.decode, ids, SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,)))
    assert "".join(g) == want[: want.index(stop)] and g.finish_reason == "stop"


def test_a_swapped_model_closes_only_after_its_last_request():
    from itera.jobs.serve.engine import ModelPool

    class Fake:
        def __init__(self, v):
            self.source = type("S", (), {"version": v, "sha256": str(v), "path": f"/m{v}"})()
            self.in_flight, self.retired, self.closed = 0, False, False

        def close(self):
            self.closed = True

    a, b = Fake(1), Fake(2)
    pool = ModelPool(a)
    held = pool.checkout()
    pool.swap(b)
    assert held is a and not a.closed and pool.checkout() is b
    pool.release(held)
    assert a.closed and not b.closed
    assert [e["version"] for e in pool.served] == [1, 2]


# --------------------------------------------------------------------------- the API with the openai client


def test_openai_client_completions_equal_greedy_generation(main_server, models, ref):
    client = main_server.openai()
    rt = ref.get(models["gguf"])
    want, n = ref.greedy(models["gguf"], rt.tokenizer.encode(PROMPT), 24)
    [listed] = client.models.list().data
    assert listed.id == "chat"
    r = client.completions.create(model="chat", prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == want and r.usage.completion_tokens == n
    assert r.usage.prompt_tokens == len(rt.tokenizer.encode(PROMPT))
    assert r.id.startswith("cmpl-") and r.system_fingerprint == "chat" and r.model == "chat"
    streamed = list(client.completions.create(model="chat", prompt=PROMPT, max_tokens=24, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "length" and len({c.id for c in streamed}) == 1


def test_openai_client_chat_equals_greedy_on_the_models_template(main_server, models, ref):
    client = main_server.openai()
    rt = ref.get(models["gguf"])
    ids = chat_prompt_ids(rt, MESSAGES, models["ckpt"] / "tokenizer.json")
    assert ids[0] == rt.tokenizer.bos_id and ids.count(rt.tokenizer.bos_id) == 1  # <s> parsed as BOS, once
    want, n = ref.greedy(models["gguf"], ids, 20)
    r = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.id.startswith("chatcmpl-")
    chunks = list(client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == n and chunks[-2].choices[0].finish_reason == "length"
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES]  # content as parts
    r = main_server.client().post("/v1/chat/completions", json={"messages": parts, "max_tokens": 20, "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == want
    with pytest.raises(openai.BadRequestError) as e:  # the template's own raise_exception
        client.chat.completions.create(model="chat", messages=[{"role": "assistant", "content": "hi"}])
    assert e.value.body["param"] == "messages" and "starts with a system or user" in e.value.body["message"]


def test_sampling_is_seeded_and_stop_strings_cut(main_server, models, ref):
    c = main_server.client()
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 11}
    neutral = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": None, "user": "u-1"}
    a, b = (c.post("/v1/completions", json={**body, **neutral}).json() for _ in range(2))
    assert a["choices"][0]["text"] == b["choices"][0]["text"] and a["id"] != b["id"]
    rt = ref.get(models["gguf"])
    g = Generation(rt.stepper(), rt.tokenizer.decode, rt.tokenizer.encode(PROMPT),
                   SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=11), frozenset({rt.tokenizer.eos_id}))
    assert a["choices"][0]["text"] == "".join(g)
    want, _ = ref.greedy(models["gguf"], rt.tokenizer.encode(PROMPT), 24)
    stop = want[8:11]
    r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                         "stop": ["never in it", stop]}).json()
    assert r["choices"][0]["text"] == want[: want.index(stop)] and r["choices"][0]["finish_reason"] == "stop"
    # the store keeps which stop string ended it (dpo-train scores it after the response), no end token
    row = sqlite3.connect(main_server.db).execute("SELECT end_token, end_text FROM responses WHERE id = ?",
                                                  (r["id"],)).fetchone()
    assert row == (None, stop)
    with c.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                                   "stop": stop, "stream": True}) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == want[: want.index(stop)]


def test_health_models_and_metrics(main_server, models):
    c = main_server.client()
    h = c.get("/health").json()
    from itera.fsio import artifact_digest

    assert h["status"] == "ok" and h["model"] == "chat" and h["version"] is None and h["runtime"] == "llama.cpp"
    assert h["sha256"] == artifact_digest(models["gguf"])[1] and h["uptime_s"] > 0
    m = c.get("/v1/models").json()["data"][0]["itera"]
    assert m["max_context"] == 256 and m["chat_template"] is True and m["format"] == "gguf"
    c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0})
    text = c.get("/metrics").text
    assert c.get("/metrics").headers["content-type"].startswith("text/plain")

    def value(name, **labels):
        sel = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # the exposition sorts labels
        pat = re.escape(name) + (r"\{" + re.escape(sel) + r"\}" if labels else "") + r" ([0-9.e+]+)"
        found = re.search(pat, text)
        assert found, (name, labels)
        return float(found.group(1))

    assert value("itera_http_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert value("itera_generated_tokens_total") >= 5
    assert value("itera_time_to_first_token_seconds_count", endpoint="/v1/completions") >= 1
    assert value("itera_request_duration_seconds_count", endpoint="/v1/completions") >= 1
    assert value("itera_queue_depth") == 0
    assert value("itera_model_info", model="chat", version="", sha256=h["sha256"]) == 1


def test_bad_input_gets_a_4xx_naming_the_field(main_server):
    c = main_server.client()
    post = lambda path, **kw: c.post(path, **kw)  # noqa: E731
    as_json = {"Content-Type": "application/json"}
    _error(post("/v1/completions", content=b'{"prompt": "x", ', headers=as_json), 400, None, "invalid_json")
    _error(post("/v1/completions", content=b'[1, 2]', headers=as_json), 400, None, "invalid_json")
    _error(post("/v1/completions", content=b'{"prompt": "x", "max_tokens": NaN}', headers=as_json), 400, None,
           "invalid_json")
    _error(post("/v1/completions", json={"prompt": "x", "colour": "blue"}), 400, "colour", "unknown_field")
    _error(post("/v1/completions", json={"prompt": "x", "max_tokens": "12"}), 400, "max_tokens")
    _error(post("/v1/completions", json={"prompt": "x", "temperature": 7}), 400, "temperature")
    _error(post("/v1/completions", json={"prompt": "x", "stop": 3}), 400, "stop")
    _error(post("/v1/completions", json={"max_tokens": 3}), 400, "prompt", "missing_field")
    _error(post("/v1/completions", json={"prompt": "x", "n": 2}), 400, "n", "unsupported_parameter")
    err = _error(post("/v1/completions", json={"prompt": "x", "max_tokens": 1000}), 400, "max_tokens",
                 "context_length_exceeded")
    assert "at most 254" in err["message"]  # 256-token context minus BOS and "x"
    _error(post("/v1/completions", json={"prompt": "owl " * 400}), 400, "prompt", "context_length_exceeded")
    _error(post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400, "messages.0.role")
    _error(post("/v1/chat/completions", json={"messages": []}), 400, "messages")
    _error(post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}), 404, "model", "model_not_found")
    _error(post("/v1/feedback", json={"type": "thumbs", "response_id": "cmpl-nope", "vote": "up"}), 404,
           "response_id", "response_not_found")
    _error(post("/v1/feedback", json={"type": "thumbs", "response_id": "x", "vote": "sideways"}), 400, "vote")
    _error(post("/v1/feedback", json={"type": "emoji", "response_id": "x"}), 400, "type")
    _error(post("/v1/feedback", json={"type": "rating", "response_id": "x", "rating": "5"}), 400, "rating")
    _error(c.get("/v1/nothing"), 404, None)
    with pytest.raises(openai.BadRequestError) as e:
        main_server.openai().completions.create(model="chat", prompt="x", max_tokens=5000)
    assert e.value.body["param"] == "max_tokens"


def test_a_browser_cannot_reach_a_loopback_server(main_server):
    """DNS rebinding (a foreign Host), a simple cross-site POST (text/plain), a foreign Origin:
    each refused before the body is read, so nothing is generated or stored; no CORS grant."""
    c = main_server.client()
    port = main_server.url.rsplit(":", 1)[1]
    before = _count(main_server.db, "feedback"), _count(main_server.db, "responses")
    body = b'{"prompt":"Once upon a time","max_tokens":4}'
    rebound = {"Host": f"evil.example:{port}", "Content-Type": "text/plain"}
    err = _error(c.post("/v1/completions", content=body, headers=rebound), 403, None, "host_not_allowed")
    assert "Host 'evil.example:" in err["message"] and "--allowed-host" in err["message"]
    _error(c.get("/v1/models", headers={"Host": "evil.example"}), 403, None, "host_not_allowed")
    fb = b'{"type":"correction","response_id":"cmpl-x","text":"poison"}'
    _error(c.post("/v1/feedback", content=fb, headers=rebound), 403, None, "host_not_allowed")
    _error(c.post("/v1/feedback", content=fb, headers={"Content-Type": "text/plain"}), 415, None,
           "unsupported_media_type")
    _error(c.post("/v1/completions", content=body, headers={"Content-Type": "text/plain"}), 415, None,
           "unsupported_media_type")
    _error(c.post("/v1/completions", content=body), 415, None, "unsupported_media_type")
    _error(c.post("/v1/completions", content=body, headers={"Content-Type": "application/json",
                                                            "Origin": "http://evil.example"}),
           403, None, "origin_not_allowed")
    _error(c.post("/v1/feedback", content=fb, headers={"Content-Type": "application/json", "Origin": "null"}),
           403, None, "origin_not_allowed")
    pre = c.options("/v1/completions", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                                                "Access-Control-Request-Headers": "content-type"})
    assert "access-control-allow-origin" not in pre.headers and pre.status_code >= 400
    assert (_count(main_server.db, "feedback"), _count(main_server.db, "responses")) == before
    # what a local client sends still works, with the loopback names and a same-origin Origin
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        ok = c.post("/v1/completions", content=body, headers={"Host": host, "Content-Type": "application/json; charset=utf-8",
                                                              "Origin": f"http://localhost:{port}"})
        assert ok.status_code == 200 and "access-control-allow-origin" not in ok.headers, ok.text


def _count(db: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(db)) as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_a_client_that_leaves_mid_stream_frees_its_slot(main_server, models, ref):
    n = 256 - len(ref.get(models["gguf"]).tokenizer.encode(PROMPT))
    c = main_server.client()
    with c.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": n, "temperature": 0,
                                                   "stream": True}) as s:
        assert next(s.iter_lines()).startswith("data: ")
    # the connection closed mid-stream: the generation stops (or ends) and its slot comes back
    t0 = time.monotonic()
    while (c.get("/health").json()["in_flight"] or c.get("/health").json()["queued"]) and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    assert c.get("/health").json()["in_flight"] == 0
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both slots answer again
        codes = list(pool.map(lambda _: main_server.client().post(
            "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}).status_code, range(2)))
    assert codes == [200, 200]


def test_a_client_that_leaves_while_queued_is_cancelled_and_nothing_is_stored(ref, tokenizer_dir, tmp_path):
    """The one slot busy with a long generation, a non-streamed request waits in the queue and its
    client hangs up: the request leaves the queue at once, never generates anything, and nothing
    of it is stored. (A context of 16k tokens keeps the first generation going.)"""
    import socket
    from urllib.parse import urlsplit

    long_ctx = save_tiny(tmp_path / "long", tokenizer_dir, max_position_embeddings=16384)
    run_itera("export", "--model", long_ctx, "--format", "gguf", "--gguf-type", "F32", "--out", tmp_path / "long.gguf")
    db = tmp_path / "fb.db"
    s = Served("--model", tmp_path / "long.gguf", "--feedback-db", db, "--max-concurrency", "1", "--max-queue", "1")
    try:
        c = s.client()

        def wait_for(key, value):
            t0 = time.monotonic()
            while c.get("/health").json()[key] != value and time.monotonic() - t0 < 60:
                time.sleep(0.02)
            assert c.get("/health").json()[key] == value, key

        prompt = "A request whose client hangs up: the fox"
        body = json.dumps({"prompt": prompt, "max_tokens": 64, "temperature": 0}).encode()
        url = urlsplit(s.url)
        streamer = s.client()
        with streamer.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 16000,
                                                               "temperature": 0, "stream": True}) as st:
            lines = st.iter_lines()  # held: a dropped iterator closes the response
            assert next(lines).startswith("data: ")  # the slot is generating
            sock = socket.create_connection((url.hostname, url.port))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for("queued", 1)
            sock.close()  # the client leaves while its request waits: its place in the queue is given up
            wait_for("queued", 0)
            assert c.get("/health").json()["in_flight"] == 1  # while the slot is still generating
        wait_for("in_flight", 0)  # the stream's client left too
        metrics = c.get("/metrics").text
        r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200  # the server answers as before
    finally:
        s.stop()
    stored = [row[0] for row in sqlite3.connect(db).execute("SELECT prompt FROM responses")]
    assert stored == [prompt]  # only the last request; neither cancelled one
    prompts = float(re.search(r"^itera_prompt_tokens_total (\S+)$", metrics, re.M).group(1))
    assert prompts == len(ref.get(tmp_path / "long.gguf").tokenizer.encode(PROMPT))  # the stream's prompt only:
    # the departed request's was never evaluated


def test_feedback_over_http_trains_dpo_and_peft_loads_the_adapter(main_server, models, tmp_path):
    """Four prompts with one usable signal each (thumbs, A/B, correction, ratings) and one lonely
    up-vote: dpo-train --feedback-db builds exactly four pairs and counts the drop; PEFT applies
    the adapter it writes with the logits of itera's merged checkpoint."""
    c = main_server.client()
    prompts = [f"The {w} fox sees the owl" for w in ("small", "quiet", "brave", "green", "tall")]

    def two(prompt):
        out = [c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": s}).json()
               for s in (1, 2)]
        assert out[0]["choices"][0]["text"] != out[1]["choices"][0]["text"]
        return [o["id"] for o in out]

    ids = [two(p) for p in prompts]
    events = [{"type": "thumbs", "response_id": ids[0][0], "vote": "up"},
              {"type": "thumbs", "response_id": ids[0][1], "vote": "down"},
              {"type": "ab", "a_id": ids[1][0], "b_id": ids[1][1], "winner": "b"},
              {"type": "correction", "response_id": ids[2][0], "corrected": " the happy owl."},
              {"type": "rating", "response_id": ids[3][0], "rating": 5},
              {"type": "rating", "response_id": ids[3][1], "rating": 2},
              {"type": "thumbs", "response_id": ids[4][0], "vote": "up"}]
    stored = []
    for ev in events:
        r = c.post("/v1/feedback", json=ev)
        assert r.status_code == 201, r.text
        stored.append(r.json()["id"])
    assert stored == sorted(stored) and len(set(stored)) == len(events)
    _error(c.post("/v1/feedback", json={"type": "ab", "a_id": ids[0][0], "b_id": ids[1][0], "winner": "a"}), 400,
           "b_id")  # two different prompts
    # each stored response keeps the serving tokenizer's fingerprint (the checkpoint's: same vocabulary)
    # and, when the model ended it (no stop strings asked for), the id of the token that did
    from itera.tokenizer import Tokenizer, fingerprint

    mine = [i for pair in ids for i in pair]  # this test's responses (the module's server stored others)
    rows = sqlite3.connect(main_server.db).execute(
        f"SELECT finish_reason, end_token, tokenizer FROM responses WHERE id IN ({','.join('?' * len(mine))})",
        mine).fetchall()
    assert len(rows) == len(mine)
    assert {fp for _, _, fp in rows} == {fingerprint(Tokenizer.from_dir(models["ckpt"]))}
    assert all((finish == "stop") == (end is not None) for finish, end, _ in rows)
    out = tmp_path / "adapter"
    rec = run_itera("dpo-train", "--model", models["ckpt"], "--feedback-db", main_server.db, "--out", out,
                    "--steps", "4", "--batch-size", "2", "--holdout", "0", "--lr", "1e-2", "--merge",
                    "--save-pairs", tmp_path / "pairs.jsonl").record
    m = rec["metrics"]
    # --loss auto: the lonely up-vote is a response judged alone, too few for KTO: dropped, counted
    assert m["pairs_used"] == 4 and m["singles_used"] == 0
    assert m["dropped_reasons"] == {"judged alone, not trained: only one (KTO's reference point needs another to "
                                    "mismatch)": 1}
    pairs = [{k: p[k] for k in ("prompt", "chosen", "rejected")}
             for p in map(json.loads, (tmp_path / "pairs.jsonl").read_text().splitlines())]
    assert {p["prompt"] for p in pairs} == set(prompts[:4])
    assert {"prompt": prompts[2], "chosen": " the happy owl.", "rejected": _text(main_server.db, ids[2][0])} in pairs
    assert {"prompt": prompts[1], "chosen": _text(main_server.db, ids[1][1]),
            "rejected": _text(main_server.db, ids[1][0])} in pairs
    import torch
    import transformers
    from peft import PeftModel

    base = transformers.LlamaForCausalLM.from_pretrained(models["ckpt"], dtype=torch.float32)
    x = torch.randint(0, 290, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base(input_ids=x).logits
        tuned = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=x).logits
        merged = transformers.LlamaForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)(input_ids=x).logits
    assert (tuned - plain).abs().max() > 1e-4  # the adapter changes the model
    assert (tuned - merged).abs().max() < 1e-4


def _text(db: Path, response_id: str) -> str:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT response FROM responses WHERE id = ?", (response_id,)).fetchone()[0]


# --------------------------------------------------------------------------- other runtimes, auth


def test_checkpoint_through_torch_with_an_api_key(models, ref, tmp_path):
    """A checkpoint with no chat template, behind a key: /health is open, everything else needs
    the key; completions equal torch greedy; chat says there is no template."""
    key = tmp_path / "key"
    key.write_text("k" * 8 + "0123456789abcdef\n")
    s = Served("--model", models["plain"], "--api-key-file", key, "--feedback-db", tmp_path / "fb.db")
    try:
        anon, wrong, good = s.client(), s.client("nope" * 8), s.client("k" * 8 + "0123456789abcdef")
        assert anon.get("/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/v1/nothing"):
            assert _error(anon.get(path), 401, None, "invalid_api_key") and anon.get(path).headers["www-authenticate"]
        _error(wrong.post("/v1/completions", json={"prompt": PROMPT}), 401, None, "invalid_api_key")
        _error(anon.post("/v1/feedback", json={"type": "thumbs"}), 401, None)
        with pytest.raises(openai.AuthenticationError):
            s.openai("wrong-key-wrong-key").completions.create(model="tiny", prompt=PROMPT)
        rt = ref.get(models["plain"])
        want, _ = ref.greedy(models["plain"], rt.tokenizer.encode(PROMPT), 12)
        r = s.openai("k" * 8 + "0123456789abcdef").completions.create(model="tiny", prompt=PROMPT, max_tokens=12,
                                                                      temperature=0)
        assert r.choices[0].text == want
        _error(good.post("/v1/chat/completions", json={"messages": MESSAGES}), 400, "messages", "no_chat_template")
        assert good.get("/health").json()["runtime"] == "torch"
    finally:
        rc, _, err = s.stop()
    assert rc == 0, err


def test_onnx_through_onnxruntime_with_the_embedded_template(models, ref, tmp_path):
    s = Served("--model", models["onnx"], "--feedback-db", tmp_path / "fb.db")
    try:
        rt = ref.get(models["onnx"])
        want, _ = ref.greedy(models["onnx"], rt.tokenizer.encode(PROMPT), 12)
        client = s.openai()
        r = client.completions.create(model="chat", prompt=PROMPT, max_tokens=12, temperature=0)
        assert r.choices[0].text == want
        want_chat, _ = ref.greedy(models["onnx"], chat_prompt_ids(rt, MESSAGES, models["ckpt"] / "tokenizer.json"), 12)
        r = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == want_chat
        assert s.client().get("/health").json()["runtime"] == "onnxruntime"
    finally:
        assert s.stop()[0] == 0


def test_unsafe_or_broken_options_are_refused_before_serving(models, tmp_path):
    assert_usage_error(run_itera("serve", "--model", models["gguf"], "--host", "0.0.0.0"), "--api-key-file")
    short = tmp_path / "short"
    short.write_text("abc\n")
    assert_usage_error(run_itera("serve", "--model", models["gguf"], "--api-key-file", short), "shorter than 16")
    assert_usage_error(run_itera("serve", "--model", tmp_path / "none.gguf"), "does not exist")
    assert_usage_error(run_itera("serve", "--model", "tiny@active", "--registry", tmp_path / "none.db"),
                       "does not exist")
    assert_usage_error(run_itera("serve", "--model", models["gguf"], "--max-concurrency", "0"), "--max-concurrency")
    assert_usage_error(run_itera("serve", "--model", models["gguf"], "--registry", tmp_path / "r.db"), "--registry")


def test_dpo_train_feedback_db_options(models, tmp_path):
    base = ["dpo-train", "--model", models["ckpt"], "--out", tmp_path / "a"]
    assert_usage_error(run_itera(*base, "--feedback-db", tmp_path / "none.db"), "no feedback store at")
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    assert_usage_error(run_itera(*base, "--pairs", pairs, "--feedback-db", tmp_path / "none.db"),
                       "pass exactly one of --pairs FILE or --feedback FILE")
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------- load, durability


def test_overload_is_answered_429_and_no_feedback_is_lost(models, ref, tmp_path):
    """8 requests at once against --max-concurrency 2 --max-queue 2: the excess gets 429 with
    Retry-After, nothing gets a 5xx, every answered request is stored and takes feedback; then a
    feedback burst is cut by kill -9 and every acknowledged row is in an intact database."""
    db = tmp_path / "fb.db"
    s = Served("--model", models["gguf"], "--feedback-db", db, "--max-concurrency", "2", "--max-queue", "2")
    try:
        ids = ref.get(models["gguf"]).tokenizer.encode(PROMPT)
        n = 256 - len(ids)  # the whole context: each request takes a while
        want, _ = ref.greedy(models["gguf"], ids, n)
        barrier = threading.Barrier(8)

        def one(_):
            with s.client() as c:
                barrier.wait()
                return c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": n, "temperature": 0})

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(8)))
        codes = sorted(r.status_code for r in answers)
        assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 2, codes
        for r in answers:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "overloaded"
            else:
                assert r.json()["choices"][0]["text"] == want
        ok_ids = [r.json()["id"] for r in answers if r.status_code == 200]
        with s.client() as c:
            for i in ok_ids:
                r = c.post("/v1/feedback", json={"type": "thumbs", "response_id": i, "vote": "up"})
                assert r.status_code == 201, r.text

        acked: list[int] = []
        stop = threading.Event()

        def burst(k):
            with s.client(timeout=10) as c:
                while not stop.is_set():
                    try:
                        r = c.post("/v1/feedback", json={"type": "rating", "response_id": ok_ids[k % len(ok_ids)],
                                                         "rating": k})
                    except httpx.HTTPError:
                        return
                    if r.status_code == 201:
                        acked.append(r.json()["id"])

        threads = [threading.Thread(target=burst, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        while len(acked) < 40 and time.monotonic() - t0 < 60:
            time.sleep(0.01)
        s.proc.kill()  # SIGKILL mid-burst
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        s.stop()
    assert len(acked) >= 40
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = {r[0] for r in con.execute("SELECT id FROM feedback")}
    assert set(acked) <= rows and len(rows) >= len(acked) + len(ok_ids)
    assert {r[0] for r in con.execute("SELECT id FROM responses")} == set(ok_ids)


# --------------------------------------------------------------------------- hot swap


def _register(path: Path, registry: Path, corpus: Path) -> dict:
    ev = run_itera("evaluate", "--model", path, "-d", corpus, "--max-tokens", "300").stdout
    return run_itera("registry", "register", "--name", "tiny", "--registry", registry, stdin=ev).record


def test_hot_swap_on_promote_refuses_a_tampered_version_and_drains_on_sigterm(models, ref, tmp_path, corpus_file):
    reg = tmp_path / "registry.db"
    v3 = tmp_path / "v3.gguf"  # version 2's weights under another general.name: other bytes, same answers
    p = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(models["other_gguf"]), str(v3),
                        "--general-name", "v3", "--force"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    versions = [_register(path, reg, corpus_file)["params"]["version"]
                for path in (models["gguf"], models["other_gguf"], v3)]
    assert versions == [1, 2, 3]
    run_itera("registry", "activate", "tiny@1", "--registry", reg).record
    s = Served("--model", "tiny@active", "--registry", reg, "--feedback-db", tmp_path / "fb.db",
               "--poll-interval", "0.2")
    c, client = s.client(), s.openai()
    ids = ref.get(models["gguf"]).tokenizer.encode(PROMPT)
    v1_text, _ = ref.greedy(models["gguf"], ids, 200)
    v2_text, _ = ref.greedy(models["other_gguf"], ids, 24)

    def wait_health(pred, what):
        t0 = time.monotonic()
        while time.monotonic() - t0 < 90:
            h = c.get("/health").json()
            if pred(h):
                return h
            time.sleep(0.1)
        raise AssertionError(f"{what}: /health says {h}; stderr: {''.join(s.err)[-2000:]}")

    try:
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
        assert r.system_fingerprint == "tiny@1" and r.model_extra["itera"]["version"] == 1
        stream = client.completions.create(model="tiny@active", prompt=PROMPT, max_tokens=200, temperature=0,
                                           stream=True)
        first = next(iter(stream))
        promoted = run_itera("registry", "promote", "tiny@2", "--metric", "perplexity", "--max-regression", "1000%",
                             "--registry", reg).record
        assert promoted["artifact"]["path"] == str(models["other_gguf"].resolve())
        wait_health(lambda h: h["version"] == 2, "no swap to version 2")
        rest = list(stream)  # the stream started on version 1 finishes there
        chunks = [first] + rest
        assert {ch.system_fingerprint for ch in chunks} == {"tiny@1"}
        assert "".join(ch.choices[0].text for ch in chunks) == v1_text
        assert chunks[-1].choices[0].finish_reason == "length"
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
        assert r.system_fingerprint == "tiny@2" and r.choices[0].text == v2_text
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
        assert r.headers["x-itera-model-version"] == "2"

        with open(v3, "r+b") as f:  # tampered after registration: one byte of a tensor flipped
            f.seek(-7, os.SEEK_END)
            b = f.read(1)
            f.seek(-7, os.SEEK_END)
            f.write(bytes([b[0] ^ 0xFF]))
        # The registry refuses to promote a changed artifact (exit 2, nothing written); a file changed
        # after its promotion is what the server must still catch: move the alias as promote would have.
        refused = run_itera("registry", "promote", "tiny@3", "--metric", "perplexity", "--max-regression", "1000%",
                            "--registry", reg)
        assert refused.returncode == 2 and "changed since it was registered" in refused.stderr, refused.stderr
        from itera.registry import Registry

        with Registry(reg) as registry, registry.transaction():
            registry.storage.set_alias("tiny", "active", 3, "2026-01-01T00:00:00Z")
        h = wait_health(lambda h: (h["last_refused"] or {}).get("version") == 3, "version 3 not refused")
        assert h["version"] == 2 and "changed since it was registered" in h["last_refused"]["reason"]
        assert str(tmp_path) not in json.dumps(h)  # /health needs no key: it names no paths
        assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4).system_fingerprint == "tiny@2"
        assert any("tiny@3 not loaded" in line for line in s.err)

        run_itera("registry", "rollback", "tiny", "--to", "1", "--registry", reg).record
        wait_health(lambda h: h["version"] == 1, "no swap back to version 1 on rollback")
        assert "itera_model_swaps_total{result=\"refused\"} 1.0" in c.get("/metrics").text

        stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, temperature=0, stream=True)
        first = next(iter(stream))
        s.proc.send_signal(signal.SIGTERM)  # graceful: the stream in flight completes
        text = first.choices[0].text + "".join(ch.choices[0].text for ch in stream)
        assert text == v1_text
        assert s.wait(120) == 0  # it stops by itself once the stream is done
    finally:
        rc, out, err = s.stop()
    assert rc == 0, err
    rec = json.loads(out.strip().splitlines()[-1])
    from itera.record import validate

    validate(rec)
    m = rec["metrics"]
    assert rec["command"] == "serve" and [v["version"] for v in m["versions_served"]] == [1, 2]
    assert [(w["from"], w["to"]) for w in m["swaps"]] == [(1, 2), (2, 1)]
    assert [w["version"] for w in m["swaps_refused"]] == [3] and m["server_errors"] == 0
    assert m["requests_by_status"]["200"] >= 6
    # a server does not start on a version whose bytes changed either
    assert_usage_error(run_itera("serve", "--model", "tiny@3", "--registry", reg), "changed since it was registered")
