"""Command-line flags from a dataclass: one flag per field, help text from the field's metadata.

    @dataclass
    class Config:
        port: int = field(default=50051, metadata={"help": "gRPC port"})

    add_dataclass_arguments(parser, Config, env_prefix="RECUR_")  # --port, or RECUR_PORT
    cfg = from_args(Config, parser.parse_args())

A bool field becomes --flag/--no-flag. With env_prefix, each field also reads PREFIX<NAME>
from the environment: a flag wins over the variable, the variable over the default.
Standard library only: the serving image imports this too.
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields, is_dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(text: str) -> bool:
    """1/0, true/false, yes/no, on/off in any case; anything else is a ValueError."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("not a boolean (use 1/0, true/false, yes/no or on/off)")


def _converter(cls: type, name: str, hint: Any) -> Callable[[str], Any]:
    if hint is bool:
        return parse_bool
    if isinstance(hint, type):  # str, int, float, Path: each parses its own text
        return hint
    # Optional/Union/list fields would need their own parsing rules; none exist yet.
    raise TypeError(f"{cls.__name__}.{name}: no flag for type {hint!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type[DataclassInstance], *,
                            env_prefix: str | None = None) -> None:
    """Add --field-name for every field of `cls` (dest: the field name), default: the field's default.

    Raises ValueError naming the variable when an environment value does not parse, and
    TypeError when a field lacks metadata["help"] (every flag is documented).
    """
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)  # resolves the string annotations of `from __future__ import annotations`
    for f in fields(cls):
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no metadata['help']")
        hint = hints[f.name]
        convert = _converter(cls, f.name, hint)
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"{cls.__name__}.{f.name} has no default")  # a flag must have one
        text = f.metadata["help"].replace("%", "%%")  # argparse %-formats help strings
        if env_prefix is None:
            text += " (default: %(default)s)"
        else:
            env = env_prefix + f.name.upper()
            raw = os.environ.get(env)
            if raw is not None:
                try:
                    default = convert(raw)
                except ValueError as e:
                    reason = str(e) if hint is bool else f"not a valid {hint.__name__}"
                    raise ValueError(f"environment variable {env}={raw!r}: {reason}") from None
            text += f" [{env}; default: %(default)s]"
        flag = "--" + f.name.replace("_", "-")
        if hint is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=convert, default=default, help=text)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """An instance of `cls` from the namespace that add_dataclass_arguments filled."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def to_environment(instance: DataclassInstance, env_prefix: str) -> dict[str, str]:
    """PREFIX<NAME> -> text for every field of `instance`: what add_dataclass_arguments reads back as
    the same values (bools as true/false). Another process gets its settings this way without a
    command line (which any user of the machine can read)."""
    out = {}
    for f in fields(instance):
        value = getattr(instance, f.name)
        out[env_prefix + f.name.upper()] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out
