"""User-facing errors and the CLI wrapper that turns them into one line on stderr and exit code 2."""
from __future__ import annotations

import functools
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
