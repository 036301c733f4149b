"""``itera serve``: an OpenAI-compatible HTTP server for the model a registry alias points at,
which collects feedback for ``dpo-train`` and follows the alias when it moves.

- :mod:`itera.jobs.serve.options` — ``ServeOptions`` (validated flags);
- :mod:`itera.jobs.serve.server` — ``run_serve``: resolve, bind, load, serve, drain, report;
- :mod:`itera.jobs.serve.engine` — loaded models with their lanes, the pool and hot swap, the registry
  watcher, admission (bounded concurrency and queue);
- :mod:`itera.jobs.serve.service` — ``Server``: the state behind the routes, admission, generation on
  worker threads, storing responses;
- :mod:`itera.jobs.serve.app` — ``build_app``: the FastAPI app with its routes, behind the gate (browser
  guard, API key, request metrics);
- :mod:`itera.jobs.serve.routes` — the HTTP API's handlers (completions, chat, feedback, models, health,
  metrics) and error handlers;
- :mod:`itera.jobs.serve.openai` — OpenAI's response shapes (completion objects, stream chunks, SSE,
  usage, error bodies), pure functions;
- :mod:`itera.jobs.serve.schemas` — strict request bodies; :mod:`itera.jobs.serve.guard` — what a browser
  must not be able to do;
- :mod:`itera.chat` — chat templates; :mod:`itera.jobs.serve.metrics` — Prometheus metrics;
- :mod:`itera.feedback` — responses and feedback in SQLite (read by ``dpo-train --feedback-db``).

Decoding itself (sampling, stop strings, streaming text) is :mod:`itera.runtime.sampling`.
Importing this package imports nothing heavy.
"""
