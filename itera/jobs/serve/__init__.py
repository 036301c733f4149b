"""``itera serve``: an OpenAI-compatible HTTP server for the model a registry alias points at,
which collects feedback for ``dpo-train`` and follows the alias when it moves.

- :mod:`itera.jobs.serve.options` — ``ServeOptions`` (validated flags);
- :mod:`itera.jobs.serve.server` — ``run_serve``: resolve, bind, load, serve, drain, report;
- :mod:`itera.jobs.serve.engine` — loaded models with their lanes, the pool and hot swap, the registry
  watcher, admission (bounded concurrency and queue);
- :mod:`itera.jobs.serve.app` and :mod:`itera.jobs.serve.schemas` — the HTTP API and its strict request bodies;
- :mod:`itera.chat` — chat templates; :mod:`itera.jobs.serve.metrics` — Prometheus metrics;
- :mod:`itera.feedback` — responses and feedback in SQLite (read by ``dpo-train --feedback-db``).

Decoding itself (sampling, stop strings, streaming text) is :mod:`itera.runtime.sampling`.
Importing this package imports nothing heavy.
"""
