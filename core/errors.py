"""User-facing errors: a `DFQFError` is a problem with the user's input (files, flags, data), which every
CLI prints as one `error: ...` line on stderr with exit code 2 (`core.cli.cli_main`)."""
from __future__ import annotations

EXIT_USAGE = 2


class DFQFError(Exception):
    """A problem with the user's input (files, flags, data). CLIs print it as one line, exit 2."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, for wrapping a library's exception into a DFQFError.

    >>> first_line(ValueError("bad value\\nmore detail"))
    'ValueError: bad value'
    """
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit]}" if text else type(e).__name__
