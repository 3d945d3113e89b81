"""The CLI toolkit every command uses: one error line and exit 2 for bad input, and options dataclasses
turned into argparse parsers (defaults < preset such as --smoke < --config JSON file < flags).

An options class is a frozen dataclass whose fields are made with `option(...)`; it validates itself in
`__post_init__` with `check_fields` (types and each field's `check`), so the Python API, a config file and
the command line all go through one validation:

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Example:
...     steps: int = option(10, "training steps", check=positive)
...     name: str | None = option(None, "a name")
...     def __post_init__(self) -> None:
...         check_fields(self)
>>> parse_options(Example, ["--steps", "3"], "example")
Example(steps=3, name=None)
>>> Example(steps=2.5)
Traceback (most recent call last):
...
core.errors.DFQFError: steps must be an integer, got 2.5
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any, Callable

from .errors import EXIT_USAGE, DFQFError

Check = Callable[[Any], None]  # raises ValueError("must be ...") for a bad value


class CLIParser(argparse.ArgumentParser):
    """argparse with usage errors as one 'error: ...' line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def cli_main(fn: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Decorate a CLI entry point: DFQFError -> 'error: ...' on stderr and exit 2, never a traceback."""

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


# -- value checks (raise ValueError with what the value must be) ------------------------------------------
def positive(v: Any) -> None:
    if not (v > 0 and math.isfinite(v)):  # nan and inf too (inf is no budget, and not JSON)
        raise ValueError("must be positive and finite")


def non_negative(v: Any) -> None:
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError("must be >= 0 and finite")


def fraction(v: Any) -> None:
    if not 0 <= v <= 1:
        raise ValueError("must be in 0..1")


def one_of(*choices: Any) -> Check:
    """A check that the value is one of `choices` (also the flag's argparse choices)."""

    def check(v: Any) -> None:
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(map(str, choices))}")

    check.choices = choices  # type: ignore[attr-defined]
    return check


def each(check: Check) -> Check:
    """A check of every element of a list value."""

    def check_all(values: Any) -> None:
        for v in values:
            check(v)

    return check_all


def distinct(values: Any) -> None:
    if len(set(values)) != len(values) or not values:
        raise ValueError("must be a non-empty list without duplicates")


# -- argparse types -----------------------------------------------------------------------------------------
def _typed(kind: type, what: str, check: Check | None = None) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if check is not None:
            try:
                check(value)
            except ValueError as e:
                raise argparse.ArgumentTypeError(f"{e}, got {text}") from None
        return value

    parse.__doc__ = f"argparse type: {what}."
    return parse


positive_int = _typed(int, "a positive integer", positive)
positive_float = _typed(float, "a positive number", positive)


def parse_bool(text: str) -> bool:
    """argparse type: true/false, yes/no, on/off, 1/0."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _distinct_ints(text: str, least: int, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what} integers, got {text!r}") from None
    if not values or min(values) < least or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct {what} integers, got {text!r}")
    return values


def int_list(text: str) -> list[int]:
    """argparse type: '1,128' -> [1, 128] (positive, no duplicates).

    >>> int_list("1,128")
    [1, 128]
    """
    return _distinct_ints(text, 1, "positive")


def seed_list(text: str) -> list[int]:
    """argparse type: '0,1,2' -> [0, 1, 2] (non-negative, no duplicates).

    >>> seed_list("0,1,2")
    [0, 1, 2]
    """
    return _distinct_ints(text, 0, "non-negative")


def float_list(text: str) -> list[float]:
    """argparse type: '0.5,0.5,0.5' -> [0.5, 0.5, 0.5] (finite numbers).

    >>> float_list("0.49,0.48,0.45")
    [0.49, 0.48, 0.45]
    """
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def bits_map(text: str) -> dict[str, int]:
    """argparse type: 'layer3_*_aq=8,fc=6' -> {'layer3_*_aq': 8, 'fc': 6} (names or fnmatch patterns).

    >>> bits_map("layer3_*_aq=8,fc=6")
    {'layer3_*_aq': 8, 'fc': 6}
    """
    out: dict[str, int] = {}
    for item in (t for t in text.split(",") if t):
        name, sep, bits = item.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = int(bits)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected NAME=BITS[,NAME=BITS...], got {text!r}") from None
    return out


def str_list(text: str) -> list[str]:
    """argparse type: 'a,b' -> ['a', 'b'] (empty items dropped)."""
    return [v for v in text.split(",") if v]


# -- options dataclasses -----------------------------------------------------------------------------------
def option(default: Any = dataclasses.MISSING, help: str = "", *, check: Check | None = None,
           parse: Callable[[str], Any] | None = None, positional: bool = False, flag: str | None = None,
           metavar: str | None = None, hidden: bool = False, runtime: bool = False, switch: bool = False) -> Any:
    """A field of an options dataclass. check: the value's constraint (ValueError "must be ..."); parse: the
    flag's argparse type (default: from the annotation; a bool flag takes true/false); switch: a bool flag
    that takes no value (it sets the opposite of the default); positional: a positional argument; flag: the
    flag name (default --field-name); hidden: left out of --help; runtime: does not change the result."""
    meta = {"help": help, "check": check, "parse": parse, "positional": positional, "flag": flag,
            "metavar": metavar, "hidden": hidden, "runtime": runtime, "switch": switch}
    kwargs = {"metadata": meta}
    if isinstance(default, (list, dict, set)):
        kwargs["default_factory"] = lambda d=default: type(d)(d)
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base(hint: Any) -> tuple[Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return hint, False


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """`value` as the annotated type, or a DFQFError naming the field (JSON bools are not numbers, a float
    is not an integer, and numbers must be finite)."""
    base, optional = _base(hint)
    if value is None:
        if optional:
            return None
        raise DFQFError(f"{name} must not be null")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (item,) = typing.get_args(base)[:1]
        if not isinstance(value, (list, tuple)):
            raise DFQFError(f"{name} must be a list, got {value!r}")
        items = [_coerce(f"{name}[{i}]", item, v) for i, v in enumerate(value)]
        return origin(items)
    if origin is dict:
        key, item = typing.get_args(base)
        if not isinstance(value, dict):
            raise DFQFError(f"{name} must be an object, got {value!r}")
        return {_coerce(f"{name} key", key, k): _coerce(f"{name}[{k!r}]", item, v) for k, v in value.items()}
    if base is bool:
        if not isinstance(value, bool):
            raise DFQFError(f"{name} must be true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DFQFError(f"{name} must be an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DFQFError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise DFQFError(f"{name} must be a string, got {value!r}")
        return value
    if base is Path:
        if not isinstance(value, (str, Path)):
            raise DFQFError(f"{name} must be a path, got {value!r}")
        return Path(value)
    return value


def check_fields(obj: Any) -> None:
    """Validate (and coerce: int -> float, str -> Path) every field of an options dataclass instance; call it
    first in `__post_init__`. Raises a DFQFError naming the field."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = _coerce(f.name, hints[f.name], getattr(obj, f.name))
        check = f.metadata.get("check")
        if check is not None and value is not None:
            try:
                check(value)
            except ValueError as e:
                raise DFQFError(f"{f.name} {e}, got {value!r}") from None
        if value is not getattr(obj, f.name):
            object.__setattr__(obj, f.name, value)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def options_parser(cls: type, prog: str, description: str = "", presets: dict[str, dict[str, Any]] | None = None,
                   config_file: bool = True) -> CLIParser:
    """The parser of an options dataclass: a flag per field (`--field-name`, typed from the annotation),
    positional fields in order, a store-true flag per preset, and --config FILE."""
    p = CLIParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    if config_file:
        p.add_argument("--config", metavar="FILE", help="JSON object with any of the fields below (flags override it)")
    for name, values in (presets or {}).items():
        p.add_argument(f"--{name}", action="store_true", help=f"preset: {', '.join(f'{k}={v}' for k, v in values.items())}")
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in (presets or {}):
            continue
        meta = f.metadata
        base, _ = _base(hints[f.name])
        parse = meta.get("parse") or {bool: parse_bool, int: int, float: float, str: str, Path: Path}.get(base, str)
        metavar = meta.get("metavar") or ("BOOL" if parse is parse_bool else None)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        text = meta.get("help", "")
        shown = argparse.SUPPRESS if meta.get("hidden") else f"{text} (default {default})" if text else f"(default {default})"
        if meta.get("positional"):
            p.add_argument(f.name, type=parse, help=text, metavar=meta.get("metavar"),
                           **({"nargs": "?"} if f.default is not dataclasses.MISSING else {}))
        elif meta.get("switch"):
            p.add_argument(flag_name(f), dest=f.name, action="store_false" if default else "store_true", help=shown)
        else:
            extra: dict[str, Any] = {}
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                extra["required"] = True
            if getattr(meta.get("check"), "choices", None) is not None:
                extra["choices"] = meta["check"].choices
            p.add_argument(flag_name(f), dest=f.name, type=parse, metavar=metavar, help=shown, **extra)
    return p


def read_config_file(path: Path, cls: type) -> dict[str, Any]:
    """The JSON object of a --config file; only fields of `cls`."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise DFQFError(f"cannot read --config {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DFQFError(f"--config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DFQFError(f"--config {path} must hold a JSON object")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise DFQFError(f"--config {path}: unknown fields {unknown}")
    return data


def parse_options(cls: type, argv: list[str] | None, prog: str, description: str = "",
                  presets: dict[str, dict[str, Any]] | None = None, config_file: bool = True) -> Any:
    """An instance of `cls` from the command line: defaults < presets given < --config file < flags."""
    args = vars(options_parser(cls, prog, description, presets, config_file).parse_args(argv))
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for name, preset in (presets or {}).items():
        if args.pop(name, False):
            values.update(preset)
            if name in names:
                values[name] = True
    config = args.pop("config", None)
    if config is not None:
        values.update(read_config_file(Path(config), cls))
    values.update(args)
    try:
        return cls(**values)
    except TypeError as e:  # a required field missing
        raise DFQFError(f"bad options: {e}") from None


def runtime_fields(cls: type) -> set[str]:
    """Fields marked runtime=True: they do not change a run's result."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("runtime")}


def check_report_path(path: Path, what: str) -> None:
    """Before long work: the JSON report can be written to `path`, else a DFQFError naming `what` (a flag)."""
    from .files import check_writable

    try:
        check_writable(path)
    except OSError as e:
        raise DFQFError(f"cannot write {what} {path}: {e.strerror or e}") from None


def emit_report(report: dict[str, Any], path: Path | None) -> None:
    """Print `report` as the last stdout line, then write it to `path` (atomically): a write that fails after
    the work loses nothing, the error line says where the report is."""
    from .files import write_json_atomic

    print(json.dumps(report))
    if path is not None:
        try:
            write_json_atomic(report, path)
        except OSError as e:
            raise DFQFError(f"cannot write {path}: {e.strerror or e} (the report is the line above)") from None
