"""Edge validation of `POST /v1/runs` bodies against the ARP `RunStartRequest` schema.

Two well-kept libraries, each where it is good: fastjsonschema compiles the
schema into Python code once and accepts a valid body on the request path;
only a refused body is handed to jsonschema, which lists every problem, so
the 400 names each one. The schema files are package data (`schemas/`); their
relative `$ref`s resolve to those files, never to the network.

    validate = load_run_start_validator()
    problems = validate(json.loads(body))   # [] when valid, else [{"path": ..., "message": ...}]
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

import fastjsonschema
from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

Problem = dict[str, str]

SCHEMA_DIR = Path(__file__).with_name("schemas")
RUN_START_SCHEMA = "run_gateway/runs/run_start_request.schema.json"

_JSON_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
               float: "number", type(None): "null"}


@cache
def _read(uri: str) -> dict[str, Any]:
    """A schema file by its file: URI; only files under SCHEMA_DIR, so nothing is ever fetched."""
    path = Path(uri.removeprefix("file://")).resolve()
    if not path.is_relative_to(SCHEMA_DIR.resolve()):
        raise ValueError(f"schema reference outside {SCHEMA_DIR}: {uri}")
    return json.loads(path.read_text(encoding="utf-8"))


def _remote(uri: str) -> dict[str, Any]:
    raise ValueError(f"schema reference to the network refused: {uri}")


def _uri(path: Path) -> str:
    return path.resolve().as_uri()


def _accepting(schema_path: Path) -> Callable[[Any], Any]:
    """fastjsonschema's compiled check: returns for a valid document, raises JsonSchemaValueException."""
    uri = _uri(schema_path)
    # The $id gives the relative $refs a base; the `file` handler serves them from SCHEMA_DIR.
    # `format` stays an annotation, as in JSON Schema 2020-12 without a format assertion.
    return fastjsonschema.compile({**_read(uri), "$id": uri},
                                  handlers={"file": _read, "http": _remote, "https": _remote},
                                  use_default=False, use_formats=False)


def _listing(schema_path: Path) -> Draft202012Validator:
    """jsonschema, with every schema file registered under its file: URI."""
    registry: Registry = Registry()
    for path in SCHEMA_DIR.rglob("*.schema.json"):
        registry = registry.with_resource(_uri(path), Resource.from_contents(
            _read(_uri(path)), default_specification=DRAFT202012))
    return Draft202012Validator({"$ref": _uri(schema_path)}, registry=registry)


def _render(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "$"


def _type_message(names: list[str], value: Any) -> str:
    return f"must be of type {' or '.join(names)}, not {_JSON_NAMES.get(type(value), type(value).__name__)}"


def _problems(error: ValidationError) -> list[Problem]:
    """One jsonschema error as problems named by instance path; `required` and
    `additionalProperties` become one problem per property, at that property's path."""
    at = list(error.absolute_path)
    kind: Any = error.validator
    expected: Any = error.validator_value
    schema: Any = error.schema
    value = error.instance
    if kind == "required":
        return [{"path": _render([*at, name]), "message": "is required"}
                for name in expected if isinstance(value, dict) and name not in value]
    if kind == "additionalProperties" and expected is False and isinstance(value, dict):
        known = schema.get("properties", {})
        patterns = [re.compile(p) for p in schema.get("patternProperties", {})]
        return [{"path": _render([*at, name]), "message": "is not an allowed field"}
                for name in value if name not in known and not any(p.search(name) for p in patterns)]
    if kind == "type":
        names = [expected] if isinstance(expected, str) else list(expected)
        message = _type_message(names, value)
    elif kind == "enum":
        message = f"must be one of {', '.join(map(str, expected))}"
    elif kind == "minimum":
        message = f"must be >= {expected}"
    elif kind == "minItems":
        message = f"must have at least {expected} items"
    elif schema is False:
        message = "is not allowed"
    else:
        message = error.message
    return [{"path": _render(at), "message": message}]


def compile_schema(path: Path) -> Callable[[Any], list[Problem]]:
    """A validator for a schema file (and everything it references): [] when valid."""
    accept = _accepting(path)
    lister = _listing(path)

    def validate(document: Any) -> list[Problem]:
        try:
            accept(document)
        except fastjsonschema.JsonSchemaValueException as refused:
            problems = [p for error in lister.iter_errors(document) for p in _problems(error)]
            # fastjsonschema's verdict stands; should jsonschema find nothing, its own reason is the answer.
            return problems or [{"path": _render(refused.path[1:]), "message": refused.message}]
        return []
    return validate


def load_run_start_validator() -> Callable[[Any], list[Problem]]:
    return compile_schema(SCHEMA_DIR / RUN_START_SCHEMA)
