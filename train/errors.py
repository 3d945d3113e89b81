"""User-facing errors and the CLI wrapper that turns them into one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import functools
import math
import sys
from typing import Callable

EXIT_USAGE = 2


class DFQFError(Exception):
    """A problem with the user's input (files, flags, data). CLIs print it as one line, exit 2."""


def cli_main(fn: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Decorate a CLI entry point: DFQFError → 'error: ...' on stderr and exit 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return int(fn(argv) or 0)
        except DFQFError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130

    return wrapper


class CLIParser(argparse.ArgumentParser):
    """argparse with usage errors as one 'error: ...' line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def first_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` for wrapping library exceptions into a DFQFError."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit]}" if text else type(e).__name__


def _positive(kind: type, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive {what}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):  # nan and inf too (inf is no budget, and not JSON)
            raise argparse.ArgumentTypeError(f"must be a positive {what}, got {text}")
        return value

    parse.__doc__ = f"argparse type: a finite {what} > 0."
    return parse


positive_int = _positive(int, "integer")
positive_float = _positive(float, "number")


def bits_int(text: str) -> int:
    """argparse type: a bit width in 2..8."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer in 2..8, got {text!r}") from None
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"bits must be in 2..8, got {value}")
    return value
