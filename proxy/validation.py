"""Edge validation of `POST /v1/runs` bodies against the ARP `RunStartRequest` schema.

The schema files are compiled once into plain closures. A general JSON Schema
library costs about 80 µs per run-start body here, half the gateway's whole
per-request budget; the ARP schemas use a dozen keywords, so a compiler for
exactly those (and a hard error on any other, so a schema update can never be
skipped silently) validates the same documents in a few µs. A check returns
None for a valid value and builds error paths only on the way back up from a
failure, so valid bodies (the hot path) pay for no string work. The test
suite cross-checks it against `jsonschema` on the spec's conformance vectors.

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
# A check answers None (valid) or a list of (relative path parts, message).
Errors = list[tuple[tuple[str | int, ...], str]]
Check = Callable[[Any], Errors | None]

SCHEMA_DIR = Path(__file__).with_name("schemas")
RUN_START_SCHEMA = "run_gateway/runs/run_start_request.schema.json"

_ANNOTATIONS = frozenset({"title", "description", "format", "$schema", "$id", "$comment", "examples"})
_KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties", "patternProperties",
                       "enum", "minimum", "minItems", "items", "$ref"})
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


def _under(key: str | int, errors: Errors) -> Errors:
    return [((key, *path), message) for path, message in errors]


def _render(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "$"


def _valid(_: Any) -> None:
    return None


class _Compiler:
    def __init__(self) -> None:
        self._files: dict[Path, Check] = {}

    def file(self, path: Path) -> Check:
        path = path.resolve()
        if path not in self._files:
            # A placeholder breaks reference cycles while the file compiles.
            holder: list[Check] = []
            self._files[path] = lambda v: holder[0](v)
            holder.append(self.schema(json.loads(path.read_text()), path.parent))
            self._files[path] = holder[0]
        return self._files[path]

    def schema(self, s: dict[str, Any] | bool, base: Path) -> Check:
        if s is True or s == {}:
            return _valid
        if s is False:
            return lambda v: [((), "is not allowed")]
        unknown = set(s) - _ANNOTATIONS - _KEYWORDS
        if unknown:
            raise SchemaCompileError(f"unsupported keywords {sorted(unknown)}")
        checks: list[Check] = []
        if "$ref" in s:
            checks.append(self.file(base / s["$ref"]))
        is_object = {"properties", "required", "additionalProperties", "patternProperties"} & set(s)
        if "type" in s and not (is_object and s["type"] == "object"):
            checks.append(self._type(s["type"]))
        if "enum" in s:
            allowed = s["enum"]
            message = f"must be one of {', '.join(map(str, allowed))}"
            checks.append(lambda v: None if v in allowed else [((), message)])
        if "minimum" in s:
            low = s["minimum"]
            checks.append(lambda v: [((), f"must be >= {low}")] if _TYPES["number"](v) and v < low else None)
        if "items" in s or "minItems" in s:
            checks.append(self._array(s, base))
        if is_object:
            checks.append(self._object(s, base, typed=s.get("type") == "object"))
        return self._all(checks)

    @staticmethod
    def _all(checks: list[Check]) -> Check:
        if not checks:
            return _valid
        if len(checks) == 1:
            return checks[0]

        def check(v: Any) -> Errors | None:
            errors = None
            for c in checks:
                found = c(v)
                if found:
                    errors = (errors or []) + found
            return errors
        return check

    @staticmethod
    def _type(expected: str | list[str]) -> Check:
        names = [expected] if isinstance(expected, str) else list(expected)
        if names == ["string"]:
            return lambda v: None if isinstance(v, str) else [((), _type_message(names, v))]
        tests = [_TYPES[n] for n in names]
        return lambda v: None if any(t(v) for t in tests) else [((), _type_message(names, v))]

    def _array(self, s: dict[str, Any], base: Path) -> Check:
        item = self.schema(s["items"], base) if "items" in s else None
        min_items = s.get("minItems", 0)

        def check(v: Any) -> Errors | None:
            if not isinstance(v, list):
                return None
            errors: Errors = []
            if len(v) < min_items:
                errors.append(((), f"must have at least {min_items} items"))
            if item is not None:
                for i, x in enumerate(v):
                    found = item(x)
                    if found:
                        errors += _under(i, found)
            return errors or None
        return check

    def _object(self, s: dict[str, Any], base: Path, *, typed: bool) -> Check:
        props = {k: self.schema(v, base) for k, v in s.get("properties", {}).items()}
        required = tuple(s.get("required", ()))
        patterns = [(re.compile(k), self.schema(v, base)) for k, v in s.get("patternProperties", {}).items()]
        extra = s.get("additionalProperties", True)
        extra_check = None if extra is True or extra is False else self.schema(extra, base)
        closed = extra is False

        def check(v: Any) -> Errors | None:
            if not isinstance(v, dict):
                return [((), _type_message(["object"], v))] if typed else None
            errors = None
            for key in required:
                if key not in v:
                    errors = (errors or []) + [((key,), "is required")]
            for key, value in v.items():
                sub = props.get(key)
                if sub is not None:
                    found = sub(value)
                    if found:
                        errors = (errors or []) + _under(key, found)
                    continue
                matched = False
                for rx, pcheck in patterns:
                    if rx.search(key):
                        matched = True
                        found = pcheck(value)
                        if found:
                            errors = (errors or []) + _under(key, found)
                if matched:
                    continue
                if closed:
                    errors = (errors or []) + [((key,), "is not an allowed field")]
                elif extra_check is not None:
                    found = extra_check(value)
                    if found:
                        errors = (errors or []) + _under(key, found)
            return errors
        return check


def _type_message(names: list[str], value: Any) -> str:
    return f"must be of type {' or '.join(names)}, not {_JSON_NAMES.get(type(value), type(value).__name__)}"


def compile_schema(path: Path) -> Callable[[Any], list[Problem]]:
    """Compiles a schema file (and everything it references) into a validator."""
    check = _Compiler().file(path)

    def validate(document: Any) -> list[Problem]:
        errors = check(document)
        if not errors:
            return []
        return [{"path": _render(p), "message": m} for p, m in errors]
    return validate


def load_run_start_validator() -> Callable[[Any], list[Problem]]:
    return compile_schema(SCHEMA_DIR / RUN_START_SCHEMA)
