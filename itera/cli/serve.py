from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from itera.cli._options import MetricsOut, execute


def serve(
    model: Annotated[str, typer.Option("--model", "-m", help="NAME@active (a registry ref: the server follows the "
                                       "alias) or a checkpoint directory, .gguf or .onnx file.")],
    registry: Annotated[Optional[str], typer.Option(
        "--registry", metavar="PATH|URL",
        help="Registry for a --model NAME@active: a SQLite file or postgresql://USER@HOST:PORT/DB. Default: "
        "$ITERA_REGISTRY, else $ITERA_HOME/registry.db.")] = None,
    host: Annotated[str, typer.Option(
        help="Address to listen on; other than loopback needs --api-key-file.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: a free one, printed on stderr).")] = 8080,
    api_key_file: Annotated[Optional[Path], typer.Option(help="File whose first line is the key every endpoint but "
                                                         "/health requires (Authorization: Bearer KEY).")] = None,
    max_concurrency: Annotated[int, typer.Option(help="Generations at once (one KV cache each).")] = 2,
    max_queue: Annotated[int, typer.Option(help="Requests waiting for a slot; more get 429 with Retry-After.")] = 16,
    feedback_db: Annotated[Optional[str], typer.Option(
        metavar="PATH|URL", help="Store of responses and feedback: a SQLite file, or postgresql://USER@HOST:PORT/DB "
        "that several servers write into. Default: $ITERA_HOME/feedback.db.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads per generation (llama.cpp; default: the cores "
                                                   "divided among --max-concurrency) or for the runtime.")] = None,
    chat_template: Annotated[Optional[Path], typer.Option(dir_okay=False, help="Jinja chat template replacing the "
                                                          "model's own.")] = None,
    poll_interval: Annotated[float, typer.Option(help="Seconds between looks at the registry alias.")] = 1.0,
    shutdown_timeout: Annotated[float, typer.Option(
        help="Seconds requests in flight get to finish after SIGTERM.")] = 30.0,
    allowed_host: Annotated[Optional[list[str]], typer.Option(
        help="A name besides loopback's that requests may carry in Host and Origin (repeatable), e.g. the "
             "machine's name when a proxy forwards to the server.")] = None,
    metrics_out: MetricsOut = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, collect feedback, follow the registry.

    POST /v1/completions and /v1/chat/completions (stream: true for server-sent events), GET
    /v1/models, POST /v1/feedback (thumbs, rating, ab, correction on response ids), GET /health,
    GET /metrics (Prometheus). Request bodies must be application/json; a request whose Host or
    Origin names another site than loopback (or an --allowed-host) is refused with 403, so a web
    page cannot reach the server through the browser (DNS rebinding). With NAME@active the server
    swaps to the version the alias points at after checking its sha256; requests in flight finish
    on the old one. SIGTERM drains and
    stops; the record then says what was served.

    Examples:

      itera serve --model pydocs-demo@active --registry runs/demo/registry.db \\
        --port 8080

      # on every interface: needs a key
      itera serve --model runs/demo/student-q4.gguf --host 0.0.0.0 \\
        --api-key-file key.txt
    """
    from itera.jobs.serve.options import ServeOptions
    from itera.jobs.serve.server import run_serve

    if registry is None and "@" in model and os.environ.get("ITERA_REGISTRY"):
        registry = os.environ["ITERA_REGISTRY"]  # the environment's registry, for a ref only
    opts = ServeOptions(model=model, registry=registry, host=host, port=port, api_key_file=api_key_file,
                        max_concurrency=max_concurrency, max_queue=max_queue, feedback_db=feedback_db,
                        threads=threads, chat_template=chat_template, poll_interval=poll_interval,
                        shutdown_timeout=shutdown_timeout, allowed_hosts=tuple(allowed_host or ()))
    execute("serve", run_serve, opts.validate(), None, metrics_out, summary=_summary)


def _summary(console, m: dict) -> None:
    versions = ", ".join(f"{'version ' + str(v['version']) if v['version'] is not None else v['path']} "
                         f"({v['requests']} request{'' if v['requests'] == 1 else 's'})" for v in m["versions_served"])
    console.log(f"served: {versions}")
