"""The itera command line: one module per subcommand, one place that turns errors into exit codes.

Command modules import only typer and light parts of the library at module level; torch,
onnxruntime and llama_cpp are imported inside the functions that need them, so
``itera --help`` stays fast.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated

import typer

from itera import __version__
from itera.cli._help import App
from itera.cli import (benchmark_power, discover_cluster, distill, dpo_train, env, evaluate, export,
                            quantize, registry, report, schema, serve)

app = App(
    name="itera",
    help="""Take a small Llama-family language model from checkpoint to a compressed, validated,
versioned edge deployment. Each command prints one JSON record on stdout; the next command reads
it from stdin. `itera COMMAND --help` says more about each.

Examples:

  itera distill --teacher runs/t --student half --data notes.txt --out runs/s
  itera quantize --model runs/s --method gptq --bits 4 --group-size 32 \\
    --calib notes.txt --out runs/s-q4 \\
    | itera export --format gguf --gguf-type Q4_0 --out runs/s-q4.gguf \\
    | itera evaluate -d notes.txt
  itera registry list
""",
    no_args_is_help=True,
)

# The one list of commands (and command groups). A test checks that `itera --help` shows exactly these.
COMMANDS = {
    "benchmark-power": benchmark_power.benchmark_power,
    "discover-cluster": discover_cluster.discover_cluster,
    "distill": distill.distill,
    "dpo-train": dpo_train.dpo_train,
    "env": env.env,
    "evaluate": evaluate.evaluate,
    "export": export.export,
    "quantize": quantize.quantize,
    "report": report.report,
    "schema": schema.schema,
    "serve": serve.serve,
}
GROUPS = {
    "registry": registry.app,
}
# Subcommands of a command (`itera distill cache`): registered under their two-word name, hidden from
# `itera --help` (the command's own help names them), reached through :func:`_join_subcommand`.
SUBCOMMANDS = {
    "distill cache": distill.cache,
}
for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)
for _name, _fn in SUBCOMMANDS.items():
    app.command(_name, hidden=True)(_fn)
for _name, _group in GROUPS.items():
    app.add_typer(_group, name=_name)


def _version(value: bool) -> None:
    if value:
        print(f"itera {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="On a terminal, print the whole record (by default a "
                                        "terminal gets it indented with the parent chain shortened, and registry "
                                        "list/show/compare/history a table; pipes and files always get the whole "
                                        "record on one line).")] = False,
) -> None:
    """itera: distill, quantize, export, evaluate and version small language models."""
    from itera import record

    record.FULL_ON_TERMINAL = json_


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"itera: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def _parser_errors():
    """The parser's exception classes: typer vendors click since 0.2x; older typer uses click itself."""
    try:
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - typer < 0.20
        from click import exceptions
    return exceptions


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush on the way out does not
    print "Exception ignored ... BrokenPipeError"."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


class _Terminated(BaseException):
    """SIGTERM, raised where the process is so that temporary outputs are removed on the way out."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def _join_subcommand(argv: list[str]) -> list[str]:
    """``distill cache ...`` as the one word ``distill cache`` the app registers (the command word is
    the first argument that is not a root option; ``distill`` itself takes no positional argument)."""
    i = next((n for n, a in enumerate(argv) if not a.startswith("-")), None)
    if i is not None and i + 1 < len(argv) and f"{argv[i]} {argv[i + 1]}" in SUBCOMMANDS:
        return [*argv[:i], f"{argv[i]} {argv[i + 1]}", *argv[i + 2:]]
    return argv


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and map exceptions to one line and an exit code."""
    from itera.errors import IteraError

    argv = _join_subcommand(list(sys.argv[1:] if argv is None else argv))

    signal.signal(signal.SIGTERM, _on_sigterm)

    parser = _parser_errors()
    debug = os.environ.get("ITERA_DEBUG", "") not in ("", "0")
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="itera", standalone_mode=False)
        sys.stdout.flush()
    except SystemExit as e:
        # click turns a write to a closed pipe (EPIPE) into exit 1 after pacifying stdout
        if e.code == 1 and _stdout_closed():
            _silence_stdout()
            raise SystemExit(0) from None
        raise
    except BrokenPipeError:
        if not _stdout_closed():
            _fail("unexpected BrokenPipeError: a pipe this command wrote to was closed "
                  "(run with ITERA_DEBUG=1 for the traceback)", 1)
        _silence_stdout()  # the reader stopped reading (`itera --help | head -1`): not this command's failure
        raise SystemExit(0) from None
    except IteraError as e:
        if debug:
            raise
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", 130)
    except _Terminated:
        _fail("terminated (SIGTERM); nothing was written", 143)
    except typer.Exit as e:  # typer.Exit and typer.Abort are click's own in older versions
        if isinstance(e.__cause__, KeyboardInterrupt):  # typer turns Ctrl-C into a silent Exit(130)
            _fail("interrupted; nothing was written", 130)
        raise SystemExit(e.exit_code) from None
    except typer.Abort:
        _fail("aborted", 130)
    except parser.NoArgsIsHelpError as e:  # `itera` or `itera registry` alone: the help, exit 2
        try:
            sys.stdout.write(e.format_message().rstrip("\n") + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
        raise SystemExit(2) from None
    except parser.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "itera"
        _fail(f"{' '.join(e.format_message().split())} (see `{where} --help`)", e.exit_code)
    except parser.ClickException as e:
        _fail(" ".join(e.format_message().split()), e.exit_code)
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if debug:
            raise
        _fail(f"unexpected {type(e).__name__}: {e} (run with ITERA_DEBUG=1 for the traceback)", 1)
    raise SystemExit(code if isinstance(code, int) else 0)
