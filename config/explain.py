"""msgspec's validation errors in words a person reads: ``Expected `str` of
length >= 8 - at `$.password``` becomes ``password: must be at least 8
characters``. Used for configuration files and for request bodies alike."""

from __future__ import annotations

import re
import typing
from typing import Any

import msgspec

__all__ = ["allowed_values", "explain", "split_path"]

_KINDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "object": "an object",
    "array": "an array",
    "null": "null",
}
_BOUNDS = {">=": "at least", "<=": "at most", ">": "greater than", "<": "less than"}

_RULES: list[tuple[re.Pattern[str], Any]] = [
    (
        re.compile(r"Expected `str` of length (>=|<=) (\d+)"),
        lambda m: f"must be {_BOUNDS[m[1]]} {m[2]} character{'' if m[2] == '1' else 's'} long",
    ),
    (
        re.compile(r"Expected `(array|object)` of length (>=|<=) (\d+)"),
        lambda m: (
            f"must have {_BOUNDS[m[2]]} {m[3]} "
            f"{'item' if m[1] == 'array' else 'key'}{'' if m[3] == '1' else 's'}"
        ),
    ),
    (
        re.compile(r"Expected `(?:int|float)` (>=|<=|>|<) (\S+)"),
        lambda m: f"must be {_BOUNDS[m[1]]} {m[2].removesuffix('.0')}",
    ),
    (
        re.compile(r"Expected `(\w+)(?: \| (\w+))*`, got `(\w+)`"),
        lambda m: f"must be {_KINDS.get(m[1], m[1])}, not {_KINDS.get(m[3], m[3])}",
    ),
    (re.compile(r"Expected `str` matching regex (.+)"), lambda m: f"must match {m[1]}"),
    (re.compile(r"Object missing required field `(\w+)`"), lambda m: f"{m[1]} is required"),
    (re.compile(r"Object contains unknown field `(\w+)`"), lambda m: f"unknown field {m[1]}"),
    (re.compile(r"Invalid enum value (.+)"), lambda m: f"{m[1]} is not one of the allowed values"),
]


def split_path(exc: msgspec.ValidationError | str) -> tuple[str, str]:
    """(what is wrong, where inside the value): msgspec appends "- at `$...`"
    for nested paths (``$[0].score``)."""
    text, _, where = str(exc).partition(" - at `$")
    return text, where.rstrip("`")


def explain(exc: msgspec.ValidationError | str, allowed: list[str] | None = None) -> str:
    """``where: what is wrong``, or only what is wrong at the top level."""
    text, where = split_path(exc)
    where = where.lstrip(".")
    for pattern, say in _RULES:
        m = pattern.fullmatch(text)
        if m is not None:
            text = say(m)
            break
    if allowed and "allowed values" in text:
        text = text.replace("the allowed values", ", ".join(allowed))
    return f"{where}: {text}" if where else text


def allowed_values(tp: Any) -> list[str] | None:
    """The values a Literal type (or an optional one) allows, quoted."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return [repr(a) for a in args]
    for arg in args:
        found = allowed_values(arg)
        if found:
            return found
    return None
