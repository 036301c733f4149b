"""The state behind the HTTP API, and generation: :class:`Server` holds the model pool, admission
(bounded concurrency and queue), the feedback store, metrics and counters; it checks a request
against the model, admits it and runs its generation on a worker thread with a lane of the model
it checked out, and stores the response (prompt, text, version) when the generation ends.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from itera.jobs.serve.engine import Admission, LoadedModel, ModelPool, Overloaded, Unavailable
from itera.jobs.serve.guard import Guard
from itera.jobs.serve.metrics import Metrics
from itera.jobs.serve.schemas import ApiError, ChatRequest
from itera.feedback import FeedbackStore, StoreUnavailable

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


@dataclass
class Prepared:
    """A request checked against one model: the prompt text and ids, and what to generate."""

    model: LoadedModel
    prompt: str
    ids: list[int]
    params: object  # itera.runtime.sampling.SamplingParams


@dataclass(eq=False)
class Job:
    id: str
    endpoint: str
    prepared: Prepared
    request: dict
    t_request: float
    cancel: threading.Event = field(default_factory=threading.Event)
    emit: Callable[[str], None] | None = None


@dataclass
class Result:
    text: str
    finish_reason: str
    completion_tokens: int


class Server:
    """The state behind the routes: the model pool, admission, the store, metrics, counters."""

    def __init__(self, pool: ModelPool, store: FeedbackStore, max_concurrency: int, max_queue: int,
                 api_key: str | None = None, aliases: tuple[str, ...] = (),
                 log: Callable[[str], None] = lambda m: None, guard: Guard | None = None):
        self.pool, self.store, self.api_key, self.log = pool, store, api_key, log
        self.guard = guard or Guard(check_host=True)
        self.admission = Admission(max_concurrency, max_queue)
        self.metrics = Metrics(self.admission)
        self.executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="itera-generate")
        self.names = {pool.current.source.name, *aliases}
        self.started = time.time()
        self.jobs: set[Job] = set()
        self.status_counts: dict[str, int] = {}
        self.stream_errors = 0  # streams that failed after their 200 was sent (the status cannot say so)
        self.generated_tokens = 0
        self.responses_stored = 0
        self.feedback_stored = 0
        self.mean_request_s = 1.0  # moving average, for Retry-After
        self.watcher = None
        self.metrics.serving(pool.current.source.name, pool.current.source.version, pool.current.source.sha256)

    # ------------------------------------------------------------------ helpers

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise ApiError(404, f"model {name!r} is not served here; this server serves "
                                f"{self.pool.current.source.name!r} (GET /v1/models)", "model", "model_not_found")

    def retry_after(self) -> str:
        a = self.admission
        return str(max(1, math.ceil(self.mean_request_s * (a.queued + 1) / max(a.slots, 1))))

    def prepare(self, m: LoadedModel, body, endpoint: str) -> Prepared:
        """Tokenize and check the request against ``m``'s context; ApiError 400 naming the field."""
        from itera.runtime.sampling import SamplingParams
        from itera.chat import ChatTemplateError, encode_rendered

        if endpoint == "chat":
            if m.chat is None:
                raise ApiError(400, f"model {m.source.label} has no chat template (no chat_template in its tokenizer "
                                    "config, no tokenizer.chat_template in the GGUF); use /v1/completions, or start "
                                    "the server with --chat-template FILE", "messages", "no_chat_template")
            try:
                prompt = m.chat.render([msg.as_dict() for msg in body.messages])
            except ChatTemplateError as e:
                raise ApiError(400, str(e), "messages", "chat_template_refused") from None
            ids, field_name = encode_rendered(m.tokenizer, prompt), "messages"
            asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        else:
            prompt = body.text()
            ids, field_name = m.tokenizer.encode(prompt), "prompt"
            asked, max_field = body.max_tokens, "max_tokens"
        ctx = m.max_context
        if not ids:
            raise ApiError(400, f"{field_name} is empty: it gives no tokens", field_name, "empty_prompt")
        if len(ids) >= ctx:
            raise ApiError(400, f"{field_name} is {len(ids)} tokens; the model's context is {ctx} tokens, which "
                                "leaves no room to generate", field_name, "context_length_exceeded")
        room = ctx - len(ids)
        if asked is not None and asked > room:
            raise ApiError(400, f"{max_field} is {asked}, but the prompt takes {len(ids)} of the model's {ctx} "
                                f"context tokens: ask for at most {room}", max_field, "context_length_exceeded")
        default = COMPLETION_DEFAULT_MAX_TOKENS if endpoint == "completion" else room
        params = SamplingParams(max_tokens=asked if asked is not None else min(default, room),
                                temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stops())
        return Prepared(m, prompt, ids, params)

    # ------------------------------------------------------------------ generation

    async def start(self, body, endpoint: str, t_request: float, cancel: threading.Event | None = None,
                    emit: Callable[[str], None] | None = None) -> tuple[Job, asyncio.Future]:
        """Admit, check out the current model, and start the generation on a worker thread (which
        stops once ``cancel`` is set: before it starts, it does no work at all). ``emit`` receives
        every text delta from the first one on."""
        self.check_model(body.model)
        self.prepare(self.pool.current, body, endpoint)  # bad requests fail here, without queueing
        try:
            await self.admission.acquire()
        except Overloaded:
            a = self.admission
            raise ApiError(429, f"the server is busy: {a.running} generations running and {a.queued} waiting "
                                f"(--max-concurrency {a.slots}, --max-queue {a.max_queue}); retry later", None,
                           "overloaded", {"Retry-After": self.retry_after()}) from None
        except Unavailable:
            raise ApiError(503, "the server is shutting down", None, "shutting_down", {"Retry-After": "5"}) from None
        m = self.pool.checkout()
        try:
            prepared = self.prepare(m, body, endpoint)  # the model may have changed while the request waited
            prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
            job = Job(prefix + secrets.token_hex(12), endpoint, prepared, _request_record(body, prepared), t_request,
                      cancel or threading.Event(), emit)
            fut = asyncio.get_running_loop().run_in_executor(self.executor, self._work, job)
        except BaseException:
            self.pool.release(m)
            self.admission.release()
            raise
        self.jobs.add(job)

        def done(_):
            self.jobs.discard(job)
            self.pool.release(m)
            self.admission.release()

        fut.add_done_callback(done)
        return job, fut

    def _work(self, job: Job) -> Result:
        """On a worker thread: generate on a lane of the job's model, store the response."""
        from itera.runtime.sampling import Generation

        p = job.prepared
        m = p.model
        lane = m.take_lane()
        try:
            t0 = time.perf_counter()
            gen = Generation(lane, m.tokenizer.decode, p.ids, p.params, m.eos_ids, job.cancel.is_set)
            for delta in gen:
                if job.emit is not None:
                    job.emit(delta)
        finally:
            m.give_lane(lane)
        label = "/v1/chat/completions" if job.endpoint == "chat" else "/v1/completions"
        if gen.first_token_s is not None:  # the prompt was evaluated (not cancelled before it started)
            self.metrics.ttft.labels(label).observe(t0 - job.t_request + gen.first_token_s)
            self.metrics.prompt_tokens.inc(len(p.ids))
        self.metrics.generated.inc(len(gen.tokens))
        self.generated_tokens += len(gen.tokens)
        if gen.finish_reason != "cancelled":
            try:
                self.store.add_response({
                    "id": job.id, "endpoint": label, "model": m.source.name, "version": m.source.version,
                    "sha256": m.source.sha256, "prompt": p.prompt, "response": gen.text,
                    "finish_reason": gen.finish_reason, "prompt_tokens": len(p.ids),
                    "completion_tokens": len(gen.tokens), "request": job.request, "end_token": gen.end_token,
                    "end_text": gen.end_text, "tokenizer": m.tokenizer_fingerprint})
            except StoreUnavailable as e:  # feedback could never name this response: the client retries
                raise ApiError(503, str(e), None, "store_unavailable", {"Retry-After": "1"}) from None
            self.responses_stored += 1
        elapsed = time.perf_counter() - job.t_request
        self.mean_request_s = 0.8 * self.mean_request_s + 0.2 * elapsed
        return Result(gen.text, gen.finish_reason, len(gen.tokens))

    def cancel_all(self) -> None:
        for job in list(self.jobs):
            job.cancel.set()

    def summary(self) -> dict:
        w = self.watcher
        # 499: the client hung up (its generation was cancelled); not an error of the server's or the request's
        errors = sum(n for s, n in self.status_counts.items() if int(s) >= 400 and s != "499")
        server_errors = sum(n for s, n in self.status_counts.items() if int(s) >= 500) + self.stream_errors
        return {
            "requests": sum(self.status_counts.values()),
            "requests_by_status": dict(sorted(self.status_counts.items())),
            "errors": errors + self.stream_errors, "server_errors": server_errors, "stream_errors": self.stream_errors,
            "uptime_s": round(time.time() - self.started, 3), "generated_tokens": self.generated_tokens,
            "responses_stored": self.responses_stored, "feedback_stored": self.feedback_stored,
            "versions_served": [{k: v for k, v in e.items() if k != "since"} for e in self.pool.served],
            "swaps": list(w.swaps) if w else [], "swaps_refused": list(w.refused) if w else [],
        }


def _request_record(body, prepared: Prepared) -> dict:
    """What the store keeps of a request besides the prompt text: the messages and sampling."""
    p = prepared.params
    out = {"max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p, "seed": p.seed,
           "stop": list(p.stop)}
    if isinstance(body, ChatRequest):
        out["messages"] = [m.as_dict() for m in body.messages]
    return out
