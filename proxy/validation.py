"""Edge validation of `POST /v1/runs` bodies against the ARP `RunStartRequest` schema.

The schema files are compiled once into plain closures. A general JSON Schema
library costs about 80 µs per run-start body here, half the gateway's whole
per-request budget; the ARP schemas use a dozen keywords, so a compiler for
exactly those (and a hard error on any other, so a schema update can never be
skipped silently) validates the same documents in a few µs. The test suite
cross-checks it against `jsonschema` on the spec's conformance vectors.

    validate = load_run_start_validator()
    problems = validate(json.loads(body))   # [] when valid
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

Problem = dict[str, str]
Check = Callable[[Any, str, list[Problem]], None]

SCHEMA_DIR = Path(__file__).with_name("schemas")
RUN_START_SCHEMA = "run_gateway/runs/run_start_request.schema.json"

_ANNOTATIONS = frozenset({"title", "description", "format", "$schema", "$id", "$comment", "examples"})
_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "null": lambda v: v is None,
}
_JSON_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
               float: "number", type(None): "null"}


class SchemaCompileError(Exception):
    """A schema uses a keyword this compiler does not implement."""


def _problem(path: str, message: str) -> Problem:
    return {"path": path or "$", "message": message}


def _child(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)


class _Compiler:
    def __init__(self, root: Path) -> None:
        self._root = root
        self._files: dict[Path, Check] = {}

    def file(self, path: Path) -> Check:
        path = path.resolve()
        if path not in self._files:
            # A placeholder breaks reference cycles; it is swapped for the real check below.
            holder: list[Check] = []
            self._files[path] = lambda v, p, out: holder[0](v, p, out)
            holder.append(self.schema(json.loads(path.read_text()), path.parent))
        return self._files[path]

    def schema(self, s: dict[str, Any] | bool, base: Path) -> Check:
        if s is True or s == {}:
            return lambda v, p, out: None
        if s is False:
            return lambda v, p, out: out.append(_problem(p, "is not allowed"))
        unknown = set(s) - _ANNOTATIONS - {"type", "properties", "required", "additionalProperties",
                                           "patternProperties", "enum", "minimum", "minItems",
                                           "items", "$ref"}
        if unknown:
            raise SchemaCompileError(f"unsupported keywords {sorted(unknown)}")
        checks: list[Check] = []
        if "$ref" in s:
            checks.append(self.file(base / s["$ref"]))
        if "type" in s:
            checks.append(self._type(s["type"]))
        if "enum" in s:
            allowed = s["enum"]
            checks.append(lambda v, p, out: None if v in allowed else
                          out.append(_problem(p, f"must be one of {', '.join(map(str, allowed))}")))
        if "minimum" in s:
            low = s["minimum"]
            checks.append(lambda v, p, out: out.append(_problem(p, f"must be >= {low}"))
                          if _TYPES["number"](v) and v < low else None)
        if "items" in s or "minItems" in s:
            checks.append(self._array(s, base))
        if {"properties", "required", "additionalProperties", "patternProperties"} & set(s):
            checks.append(self._object(s, base))
        return self._all(checks)

    @staticmethod
    def _all(checks: list[Check]) -> Check:
        if len(checks) == 1:
            return checks[0]

        def check(v: Any, p: str, out: list[Problem]) -> None:
            for c in checks:
                c(v, p, out)
        return check

    @staticmethod
    def _type(expected: str | list[str]) -> Check:
        names = [expected] if isinstance(expected, str) else list(expected)
        tests = [_TYPES[n] for n in names]

        def check(v: Any, p: str, out: list[Problem]) -> None:
            if not any(t(v) for t in tests):
                out.append(_problem(p, f"must be of type {' or '.join(names)}, "
                                       f"not {_JSON_NAMES.get(type(v), type(v).__name__)}"))
        return check

    def _array(self, s: dict[str, Any], base: Path) -> Check:
        item = self.schema(s["items"], base) if "items" in s else None
        min_items = s.get("minItems", 0)

        def check(v: Any, p: str, out: list[Problem]) -> None:
            if not isinstance(v, list):
                return
            if len(v) < min_items:
                out.append(_problem(p, f"must have at least {min_items} items"))
            if item is not None:
                for i, x in enumerate(v):
                    item(x, _child(p, i), out)
        return check

    def _object(self, s: dict[str, Any], base: Path) -> Check:
        props = {k: self.schema(v, base) for k, v in s.get("properties", {}).items()}
        required = tuple(s.get("required", ()))
        patterns = [(re.compile(k), self.schema(v, base)) for k, v in s.get("patternProperties", {}).items()]
        extra = s.get("additionalProperties", True)
        extra_check = None if extra is True or extra is False else self.schema(extra, base)

        def check(v: Any, p: str, out: list[Problem]) -> None:
            if not isinstance(v, dict):
                return
            for key in required:
                if key not in v:
                    out.append(_problem(_child(p, key), "is required"))
            for key, value in v.items():
                sub = props.get(key)
                if sub is not None:
                    sub(value, _child(p, key), out)
                    continue
                matched = False
                for rx, pcheck in patterns:
                    if rx.search(key):
                        matched = True
                        pcheck(value, _child(p, key), out)
                if matched:
                    continue
                if extra is False:
                    out.append(_problem(_child(p, key), "is not an allowed field"))
                elif extra_check is not None:
                    extra_check(value, _child(p, key), out)
        return check


def compile_schema(path: Path) -> Callable[[Any], list[Problem]]:
    """Compiles a schema file (and everything it references) into a validator."""
    check = _Compiler(path.parent).file(path)

    def validate(document: Any) -> list[Problem]:
        out: list[Problem] = []
        check(document, "", out)
        return out
    return validate


def load_run_start_validator() -> Callable[[Any], list[Problem]]:
    return compile_schema(SCHEMA_DIR / RUN_START_SCHEMA)
