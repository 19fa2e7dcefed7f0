"""The `arccompress` command: compress, ask, eval, serve, info, convert, store, demo.

Each command lives in its own module (`add_parser` registers it, `run` does it); this module assembles them
and decides how a failure ends. A user's mistake or the environment's (an `ArcCompressError`, a file the
system cannot open, a GPU out of memory) prints one line and exits 2; anything else is a bug: its traceback,
a line saying so, exit 1. `--debug` shows the traceback of every failure. Ctrl-C exits 130 with one line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence

from ..errors import ArcCompressError
from ..version import __version__
from . import ask, compress, demo, evaluate, info, serve, store

COMMANDS = (compress, ask, evaluate, serve, info, store, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arccompress", description="Compressed contexts from ARC-Encoders for "
                                     "frozen decoder LLMs: compress, store, serve, evaluate.")
    parser.add_argument("--version", action="version", version=f"arccompress {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("output")
    g.add_argument("--debug", action="store_true", help="show the traceback of any error")
    g.add_argument("--verbose", action="store_true", help="let the engines (vLLM, Ray) print their own logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub, common)
    return parser


_interrupted = False


def _exit_interrupted() -> None:
    print("arccompress: interrupted", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # at once: a library's atexit hook, interrupted in turn, would turn exit 130 into a second traceback
    os._exit(130)


def _on_sigint(signum: int, frame: object) -> None:
    """Ctrl-C raises KeyboardInterrupt as usual, so that `finally` blocks run, and is remembered: an interrupt that
    lands inside a library (a half-done import, a bare `except`) may come out as another exception or not at all.
    A second Ctrl-C exits at once."""
    global _interrupted
    if _interrupted:
        _exit_interrupted()
    _interrupted = True
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    own_handler = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.signal(signal.SIGINT, _on_sigint) if own_handler else None
    try:
        args = build_parser().parse_args(argv)
        return _run(args)
    except BaseException as e:
        if _interrupted or isinstance(e, KeyboardInterrupt):
            _exit_interrupted()
        raise
    finally:
        if own_handler:
            signal.signal(signal.SIGINT, previous)


def command() -> None:
    """The `arccompress` program: `main`, then the process's exit. After a command that ran vLLM (without
    --verbose) the interpreter's own shutdown writes to /dev/null: vLLM's dependencies report their objects at
    exit (triton's nanobind: "leaked 514 functions!"), after the command's last line."""
    argv = sys.argv[1:]
    code = main(argv)
    if "vllm" in sys.modules and "--verbose" not in argv:
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    sys.exit(code)


def _run(args: argparse.Namespace) -> int:
    import torch

    try:
        return args.run(args)
    except (ArcCompressError, OSError, torch.OutOfMemoryError) as e:
        if _interrupted:
            raise  # what an interrupt turned into, not the user's error
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(e).split("\n")) if isinstance(e, ArcCompressError) else f"{e}"
        print(f"arccompress {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception:
        if _interrupted:
            raise
        traceback.print_exc()
        print(f"arccompress {args.command}: internal error (a bug in arccompress, not in your input): the traceback "
              "above says where; please report it", file=sys.stderr)
        return 1
