"""Validation errors as the operator reads them: one `key.path: problem` line per mistake.

pydantic reports what failed in its own words and locations; this turns each error into the line
check-config prints, names the environment variable or flag a value came from, suggests the key an
unknown one was probably meant to be, and drops the error a typo merely causes (a misspelt
`audience:` is one unknown key, not also a missing `audiences`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from .models import SECRET_KEYS, GatewayConfig, shown

_UNKNOWN_KEY = {"unexpected_keyword_argument", "extra_forbidden", "invalid_key"}


def key_name(key: Any) -> str:
    """An unknown key as the operator can find it: quoted when it is empty, padded or would read as
    a path (an empty key would otherwise print as `: unknown key`)."""
    name = str(key)
    if not name or name != name.strip() or any(c in name for c in ".:[]#\n"):
        return repr(name)
    return name


def join(loc: tuple[Any, ...] | list[Any], *more: str) -> str:
    path = ""
    for part in (*loc, *(m for m in more if m)):
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return path


def _choices(expected: str) -> str:
    return expected.replace("'", "").replace(" or ", ", ")


def _reason(kind: str, ctx: Mapping[str, Any], got: str) -> str | None:
    if kind == "missing":
        return "required"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"not an integer: {got}"
    if kind in ("float_type", "float_parsing"):
        return f"not a number: {got}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        sign, bound = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
                       "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}[kind]
        limit = ctx.get(bound)
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)
        return f"must be {sign} {limit}, got {got}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false, got {got}"
    if kind in ("string_type", "string_too_short"):
        return f"must be a non-empty string, got {got}"
    if kind in ("enum", "literal_error"):
        return f"must be one of {_choices(str(ctx.get('expected', '')))}; got {got}"
    if kind in ("dataclass_type", "dataclass_exact_type", "dict_type", "model_type"):
        return f"must be a mapping, got {got}"
    if kind in ("tuple_type", "list_type", "iterable_type"):
        return f"must be a list, got {got}"
    return None


def describe(exc: ValidationError, origins: Mapping[str, str]) -> list[str]:
    """One line per problem, in the order of the keys in the models."""
    found: list[tuple[str, str, str]] = []   # (path, problem, pydantic's error type)
    implied: set[str] = set()               # keys an unknown key was probably meant to be
    for err in exc.errors(include_url=False):
        loc, kind, ctx = tuple(err["loc"]), err["type"], err.get("ctx") or {}
        if kind in _UNKNOWN_KEY and loc:
            parent, key = loc[:-1], loc[-1]
            path = join(parent, key_name(key))
            guess = _did_you_mean(parent, key)
            if guess:
                implied.add(join(parent, guess))
            found.append((path, f"unknown key; did you mean {guess}?" if guess else "unknown key", kind))
        elif kind == "config":
            for at, reason in ctx.get("problems") or [(ctx.get("at", ""), ctx.get("reason", ""))]:
                found.append((join(loc, at) or "<root>", str(reason), kind))
        else:
            # A secret's value is never echoed, not even a mistyped one: it may be the real secret.
            secret = any(part in SECRET_KEYS for part in loc if isinstance(part, str))
            reason = _reason(kind, ctx, "a value not shown (a secret)" if secret else shown(err.get("input")))
            found.append((join(loc) or "<root>", reason or str(err["msg"]), kind))
    lines: list[str] = []
    for path, reason, kind in found:
        if kind == "missing" and path in implied:
            continue
        origin = origins.get(path)
        line = f"{path}{f' (from {origin})' if origin else ''}: {reason}"
        if line not in lines:
            lines.append(line)
    return lines


def _did_you_mean(parent: tuple[Any, ...], key: Any) -> str | None:
    """A key of this section close to the unknown one, else one of a section inside it spelt so
    (`auth.audiences` belongs in `auth.issuers[]`)."""
    if not isinstance(key, str):
        return None
    known = _keys_at(parent)
    by_lower = {k.lower(): k for k in known}
    guess = difflib.get_close_matches(key.strip().lower(), list(by_lower), n=1, cutoff=0.6)
    if guess:
        return by_lower[guess[0]]
    hints = _hints(_model_at(parent)) if known else {}
    for name in known:
        inner = _model_in(hints.get(name))
        if inner is not None and key in {f.name for f in dataclasses.fields(inner)}:
            many = typing.get_origin(hints[name]) is tuple
            return f"{name}{'[]' if many else ''}.{key}"
    return None


def _model_at(loc: tuple[Any, ...]) -> Any:
    model: Any = GatewayConfig
    for part in loc:
        if isinstance(part, int):
            continue    # an index into a list of models: still that model
        model = _model_in(_hints(model).get(part))
        if model is None:
            return None
    return model


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    model = _model_at(loc)
    return [f.name for f in dataclasses.fields(model)] if model is not None else []


@functools.cache
def _hints(model: type) -> dict[str, Any]:
    return typing.get_type_hints(model)


def _model_in(hint: Any) -> type | None:
    """The model a field holds: itself, or inside `X | None` or `tuple[X, ...]`."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType, tuple):
        for arg in typing.get_args(hint):
            if (model := _model_in(arg)) is not None:
                return model
    return None
