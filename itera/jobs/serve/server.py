"""``itera serve``'s job: resolve the model, bind, load, serve until SIGTERM or Ctrl-C, drain, and
say what was served.

Phases: :func:`resolve_source` (registry ref or path; a version's sha256 checked) →
:func:`bind` (the socket, before the model loads, so a taken port fails in a second) → load (one
lane per ``--max-concurrency``) → serve (uvicorn on a thread of its own; the main thread keeps the
signals) → drain (SIGTERM or SIGINT: stop accepting, let requests in flight and in the queue
finish within ``--shutdown-timeout``, a second signal stops at once) → close the store → the
:class:`~itera.record.Outcome` with requests, errors, uptime and the versions served.
"""

from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path

from itera.errors import InputError
from itera.progress import SILENT, Reporter
from itera.record import Outcome
from itera.jobs.serve.options import ServeOptions, is_loopback, read_api_key


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise InputError(f"--host {host} does not resolve ({e.strerror}); pass an address or a resolvable "
                         "name") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_serve(opts: ServeOptions, reporter: Reporter = SILENT) -> Outcome:
    """Serve ``opts.model`` until a signal stops the server; the Outcome says what was served."""
    import uvicorn

    from itera.jobs.serve.app import build_app
    from itera.jobs.serve.service import Server
    from itera.jobs.serve.guard import Guard
    from itera.jobs.serve.engine import LoadedModel, ModelPool, Watcher, resolve_source
    from itera.feedback import FeedbackStore, default_path

    opts.validate()
    source, follow = resolve_source(opts.model, opts.registry)
    api_key = read_api_key(opts.api_key_file) if opts.api_key_file is not None else None
    template = Path(opts.chat_template).read_text("utf-8") if opts.chat_template is not None else None
    sock = bind(opts.host, opts.port)
    store = pool = server = watcher = None
    try:
        store = FeedbackStore(opts.feedback_db or default_path())

        def load(src):
            return LoadedModel(src, opts.max_concurrency, opts.threads, opts.lane_threads(), template)

        pool = ModelPool(load(source))
        aliases = (opts.model,) if opts.is_ref else ()
        guard = Guard(check_host=is_loopback(opts.host), allowed=opts.allowed_hosts)
        server = Server(pool, store, opts.max_concurrency, opts.max_queue, api_key, aliases, reporter.log, guard)
        if follow is not None:
            def on_result(ok: bool) -> None:
                server.metrics.swaps.labels("ok" if ok else "refused").inc()

            watcher = Watcher(follow, pool, load, opts.poll_interval, reporter.log, on_result)
            server.watcher = watcher
        config = uvicorn.Config(build_app(server), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=opts.shutdown_timeout, server_header=False)
        uv = uvicorn.Server(config)
        m = pool.current
        reporter.log(f"serve: {source.label} ({source.format} on {m.runtime_name}, context {m.max_context}, "
                     f"chat template {'yes' if m.chat else 'none'}) on {_url(sock)}; "
                     f"{opts.max_concurrency} at once, {opts.max_queue} queued; "
                     f"{'following ' + str(follow.ref) if follow else 'fixed version'}; feedback in {store.path}")
        _serve(uv, sock, server, watcher, reporter)
    finally:
        if watcher is not None:
            watcher.stop()
        if server is not None:
            server.cancel_all()
            server.executor.shutdown(wait=True)
        if pool is not None:
            pool.close()
        if store is not None:
            store.close()
        sock.close()
    metrics = server.summary()
    reporter.log(f"serve: stopped after {metrics['uptime_s']:.1f} s: {metrics['requests']} requests, "
                 f"{metrics['errors']} errors, {metrics['generated_tokens']} tokens generated, "
                 f"{metrics['feedback_stored']} feedback events stored")
    return Outcome(source.artifact(), metrics, {**opts.as_params(), "served": source.label})


def _serve(uv, sock: socket.socket, server, watcher, reporter: Reporter) -> None:
    """Run uvicorn on a thread; the main thread turns the first SIGTERM/SIGINT into a graceful
    drain and a second one into an immediate stop."""
    main = threading.current_thread() is threading.main_thread()
    previous = {}
    signals = {"n": 0}

    def on_signal(signum, frame):
        signals["n"] += 1
        server.admission.draining = True
        uv.should_exit = True
        if signals["n"] == 1:
            reporter.log(f"serve: {signal.Signals(signum).name}: finishing {server.admission.running} requests in "
                         f"flight and {server.admission.queued} queued, accepting no more")
        else:
            uv.force_exit = True
            server.cancel_all()

    if main:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="itera-serve", daemon=True)
    try:
        thread.start()
        if watcher is not None:
            watcher.start()
        while thread.is_alive():
            thread.join(0.25)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not uv.started:
        raise InputError("the HTTP server did not start; see the messages above")
    if signals["n"] == 0:  # it stopped by itself: that is a failure, not a shutdown
        raise RuntimeError("the HTTP server stopped without being asked to; see the messages above")
