"""The error contract every stage's command line keeps.

An error the user can fix (bad input, bad config, an unreachable endpoint) ends the command with one line on
stderr that names the file, row or field, what was found and what to do, and exit status 1; argparse's usage
errors exit 2. No traceback unless ``--debug`` is given (or ``DISTILL_DEBUG=1`` is set): then errors propagate
as they are. ``KeyboardInterrupt`` exits 130 with a line saying the same command resumes.

Each stage ends with ``sys.exit(cli.run(main))``; operators call the engine's ``run()`` and raise the same
messages, so the CLI and the task log say the same thing. ``stage_parser`` and ``start_logging`` are the rest of
a stage's command line: its flags come from its config's fields, its log lines have one format.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from distilled_plugins.core import errors
from distilled_plugins.core.settings import add_arguments

DEBUG_FLAG = "--debug"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def one_line(error: BaseException) -> str:
    """The first non-empty line of an error's message, prefixed with its type when the message alone is bare."""
    text = str(error).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if isinstance(error, KeyError):  # str(KeyError('x')) is "'x'": say what it is
        return f"missing key {first}"
    if isinstance(error, OSError) and error.filename and str(error.filename) not in first:
        return f"{error.filename}: {error.strerror or first}"
    return first or type(error).__name__


_debug = False  # set by run() from --debug / DISTILL_DEBUG


def fail(error: BaseException) -> int:
    """In a stage's ``main``: report an expected error as one line and return exit status 1 (``--debug``: raise)."""
    if _debug:
        raise error
    print(f"error: {one_line(error)}", file=sys.stderr)
    return 1


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Call ``main(argv)`` under the error contract and return the exit status (``--debug`` is taken out)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get("DISTILL_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    global _debug
    _debug = debug
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except errors.EXPECTED as e:  # the user's input or environment, not a bug: the message is the whole story
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line, and the way to see more
        if debug:
            raise
        print(
            f"error: unexpected {type(e).__name__}: {one_line(e)} (rerun with {DEBUG_FLAG} for the traceback "
            "and please report it)",
            file=sys.stderr,
        )
        return 1


def stage_parser(module: str, doc: str | None, config_class: type) -> argparse.ArgumentParser:
    """The command line of ``python -m <module>``: described by the first line of the module's docstring, with a
    flag for each field of its config (``settings.add_arguments``)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=(doc or "").split("\n")[0])
    add_arguments(parser, config_class)
    return parser


def start_logging() -> None:
    """Progress and results to stderr, one format for every stage."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
