"""Request bodies: their limits and `POST /v1/runs` against the ARP `RunStartRequest` schema.

Only POST routes take a body; it is read whole (by the gateway's body stage, within
`limits.max_body_bytes` and `limits.body_timeout_s`), and what can refuse a request before
its body is read does so first (so a refused client is never sent `100 Continue`). The
rules read the request through `BodyHead`, so they do not depend on the listener.

    bodies = BodyRules(cfg.limits)
    refusal = bodies.before(request, route)             # type, encoding, declared size
    body = bodies.checked(request, route, raw)          # bytes to forward, None, or the refusal

Two well-kept libraries, each where it is good: fastjsonschema compiles the
schema into Python code once and accepts a valid body on the request path;
only a refused body is handed to jsonschema, which lists every problem, so
the 400 names each one. Before either, orjson parses the body and
`plainly_valid` accepts the shape nearly every run start has in a few
compares, only where the schema accepts it too. The schema files are package
data (`schemas/`); their relative `$ref`s resolve to those files, never to the
network.

The schema check itself:

    validate = load_run_start_validator()
    problems = validate(json.loads(body))   # [] when valid, else [{"path": ..., "message": ...}]
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import fastjsonschema
import orjson
from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from .answers import Answer, error_answer
from .routes import START_RUN, Route

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


def plainly_valid(document: Any) -> bool:
    """True only for a RunStartRequest the full schema accepts: an object holding exactly
    `root_node_type_ref` (an object of exactly the strings `node_type_id` and `version`), `input`
    (any object) and optionally `run_id` (a string), the shape nearly every run start has. With
    the named keys present, a count equal to theirs means no other key: that is the schema's
    `required` and `additionalProperties: false`; the class compares are its `type`s (`json`
    decodes to exactly dict and str). So this says yes only where the schema does, in a few
    C-level steps; False decides nothing: the full check judges that document."""
    if document.__class__ is not dict:
        return False
    size = len(document)
    if size != 2 and (size != 3 or document.get("run_id").__class__ is not str):
        return False
    ref = document.get("root_node_type_ref")
    return (ref.__class__ is dict and len(ref) == 2 and ref.get("node_type_id").__class__ is str
            and ref.get("version").__class__ is str and document.get("input").__class__ is dict)


NodeType = tuple[str, str | None]   # (node_type_id, version)


def node_type_of(document: Any) -> NodeType | None:
    """The node type a run start names: its root_node_type_ref's id (a string, else none) and
    version (None unless a string). For any document, valid or not."""
    ref = document.get("root_node_type_ref") if document.__class__ is dict else None
    if ref.__class__ is not dict:
        return None
    node, version = ref.get("node_type_id"), ref.get("version")
    if node.__class__ is not str:
        return None
    return node, version if version.__class__ is str else None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


# orjson parses a body in half the instructions json does, for the plain-shape check alone. It accepts
# no text json rejects, rejects some json accepts (lone surrogates, 1e400) and reads an integer past
# 64 bits as a float: none of which changes whether a document has the plain shape (its checked
# fields are objects and strings, which both parse alike). Every other body is decoded and judged by
# json and the full check, as before, so problems and their messages are json's.
_loads = orjson.loads

# Built once: json.loads with any keyword argument builds a new decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_DECODE = _DECODER.decode
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _decode(text: str) -> Any:
    """json's decode, with the scanner called directly for a document that fills the text: decode()
    itself adds two whitespace regex matches and two Python frames per body. Anything else (whitespace
    around the document, text after it, no document) goes to decode() for its answer and its message."""
    try:
        document, end = _SCAN(text, 0)
    except StopIteration:
        end = -1
    if end == len(text):
        return document
    return _DECODE(text)
_JSON_TYPES = (b"application/json",)
# The exact header values clients send: accepted without parsing.
_PLAIN_JSON = frozenset({b"application/json", b"application/json; charset=utf-8", b"application/json;charset=UTF-8"})


class BodyLimits(Protocol):
    """The slice of the configuration the body rules read (`limits` in the settings)."""

    @property
    def max_body_bytes(self) -> int: ...

    @property
    def body_timeout_s(self) -> float: ...


class BodyHead(Protocol):
    """What the body rules read of a request: its head."""

    method: str
    request_id: str
    content_type: bytes | None
    content_encoding: bytes | None
    content_length: int | None


class BodyRules:
    def __init__(self, limits: BodyLimits, *, keep_documents: bool = False) -> None:
        self._limit = limits.max_body_bytes
        self.body_timeout_s = limits.body_timeout_s
        self._validate = load_run_start_validator()
        # keep_documents: the node type the last run start checked names (None when it names none),
        # for whoever reads it next (the audit record) instead of decoding the body again.
        self.node_type: NodeType | None = None
        if keep_documents:
            self._problems = self._problems_kept  # type: ignore[method-assign]

    def before(self, request: BodyHead, route: Route) -> Answer | None:
        """What refuses a request before its body is read: a body where none belongs, a run start
        that is not JSON or comes encoded (the edge validates it and decompresses nothing), a
        declared size over the limit."""
        rid = request.request_id
        if request.method != "POST":
            return _no_body(request, route) if request.content_length else None
        if route is START_RUN and request.content_type not in _PLAIN_JSON:
            ctype = (request.content_type or b"").partition(b";")[0].strip().lower()
            if ctype not in _JSON_TYPES and not (ctype.startswith(b"application/") and ctype.endswith(b"+json")):
                return error_answer(415, "unsupported_media_type", "Send the run start body as application/json",
                                    request_id=rid, details={"content_type": ctype[:100].decode("latin-1")})
        if route is START_RUN and request.content_encoding is not None:
            coding = request.content_encoding
            if coding.strip().lower() != b"identity":
                return error_answer(415, "unsupported_media_type", "Send the run start body uncompressed",
                                    request_id=rid, details={"content_encoding": coding[:100].decode("latin-1")})
        if request.content_length is not None and request.content_length > self._limit:
            return self.too_large(rid)
        return None

    def checked(self, request: BodyHead, route: Route, body: bytes) -> bytes | None | Answer:
        """None on GET routes (an empty chunked body is no body), a valid RunStartRequest on a run
        start, the body as it came on a cancel."""
        if request.method != "POST":
            return _no_body(request, route) if body else None
        if route is START_RUN:
            problems = self._problems(body)
            if problems:
                return error_answer(400, "invalid_request", "The run start request is not a valid RunStartRequest",
                                    request_id=request.request_id, details={"errors": problems})
        return body

    def _problems(self, body: bytes) -> list[Problem]:
        try:
            plain = plainly_valid(_loads(body))
        except ValueError:
            plain = False
        if plain:
            return []
        try:
            document = _decode(body.decode("utf-8"))  # RFC 8259: JSON between systems is UTF-8
        except (ValueError, RecursionError) as exc:
            problem = {"path": "$", "message": f"not valid JSON: {type(exc).__name__}"}
            if isinstance(exc, json.JSONDecodeError):
                problem["message"] = f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            return [problem]
        return self._validate(document)

    def _problems_kept(self, body: bytes) -> list[Problem]:
        # The plain shape's node type is kept as orjson read it: objects and strings, which both
        # parsers read alike, and plainly_valid has checked their types.
        self.node_type = None
        try:
            document = _loads(body)
        except ValueError:
            pass
        else:
            if plainly_valid(document):
                ref = document["root_node_type_ref"]
                self.node_type = (ref["node_type_id"], ref["version"])
                return []
        try:
            document = _decode(body.decode("utf-8"))
        except (ValueError, RecursionError):
            return BodyRules._problems(self, body)  # for its message
        self.node_type = node_type_of(document)
        return self._validate(document)

    def too_large(self, rid: str) -> Answer:
        return error_answer(413, "payload_too_large", f"The request body exceeds {self._limit} bytes",
                            request_id=rid, details={"max_body_bytes": self._limit})


def _no_body(request: BodyHead, route: Route) -> Answer:
    return error_answer(400, "invalid_request", f"{request.method} {route.template} takes no body",
                        request_id=request.request_id, details={"reason": "unexpected_body"})
