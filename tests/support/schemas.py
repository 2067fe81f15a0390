"""Validators for the spec's own JSON schemas (ErrorEnvelope, Run), read from ../shared/arp-spec-v1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.support.gateway import SPEC

OPENAPI = SPEC / "openapi" / "run-gateway.openapi.yaml"


def _retrieve(uri: str) -> Resource:
    return Resource.from_contents(json.loads(Path(uri.removeprefix("file://")).read_text()),
                                  default_specification=DRAFT202012)


def _validator(relative: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": (SPEC / "schemas" / relative).as_uri()},
                                registry=Registry(retrieve=_retrieve))  # type: ignore[call-arg]


ERROR_ENVELOPE = _validator("common/error.schema.json")
RUN = _validator("core/run.schema.json")


def envelope_problems(body: bytes) -> list[str]:
    """Why `body` is not a schema-valid ErrorEnvelope; empty when it is."""
    try:
        doc: Any = json.loads(body)
    except ValueError as exc:
        return [f"not JSON: {exc}"]
    return [f"{'/'.join(map(str, e.absolute_path)) or '$'}: {e.message}" for e in ERROR_ENVELOPE.iter_errors(doc)]


def run_problems(body: bytes) -> list[str]:
    try:
        doc: Any = json.loads(body)
    except ValueError as exc:
        return [f"not JSON: {exc}"]
    return [f"{'/'.join(map(str, e.absolute_path)) or '$'}: {e.message}" for e in RUN.iter_errors(doc)]
