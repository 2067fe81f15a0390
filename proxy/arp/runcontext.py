"""A run's `run_context`: the verified caller written into a run start, and read back as its owner.

The coordinator stores a run start's `run_context` as sent and hands it to its PDP, so whatever a
client writes there is what policy trusts. The gateway is the one component that knows who the
caller is; `RunBinder` writes that into the body before it is forwarded:

- `identity`: `{"iss", "sub"}` and each configured claim the token has;
- `actor`: `{"type": "principal", "id": <sub>}`;
- `tenant_id`: the configured tenant claim (a caller without it may not start runs);
- `trace.request_id`: the gateway's request id; `trace_id`/`span_id` from a valid `traceparent`.

A client-sent identity, actor or tenant_id unlike the gateway's is refused (or overwritten, when
so configured); equal values pass. Only the `run_context` member changes: every other member is
kept as the very bytes the client sent, in its place, because the body is spliced rather than
re-serialized (a re-serialized body would turn a number such as 1e400 into `Infinity`, which is
not JSON, and could reorder nothing but still change spellings like 1.0E2).

    binder = RunBinder(identity_claims=("email",), tenant_claim="tenant", overwrite=False)
    bound = binder.bind(body, iss, sub, claims, request_id, traceparent)   # bytes, or a BindRefusal
    run = read_run(answer_body)                                            # a Run's id and run_context
    owner = RunOwner.of(run.run_context)                                   # who a run belongs to
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any, NamedTuple

import msgspec

_MEMBER = "run_context"
_MEMBER_BYTES = b"run_context"
_BACKSLASH = 0x5C  # an int: `int in bytes` is a memchr, quicker than a search for a bytes needle
_CLOSE = 0x7D      # "}"
# Built once: json.dumps with any keyword argument builds a new encoder per call.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_WS = re.compile(r"[ \t\n\r]*")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(?:-.*)?")
_DECODER = json.JSONDecoder()
_SCAN = _DECODER.scan_once  # type: ignore[attr-defined]
_TUPLE_NEW = tuple.__new__


@dataclass(frozen=True, slots=True)
class BindRefusal:
    """Why a run start cannot be bound: `missing_tenant_claim`, `run_context_mismatch`, or an
    unusable body (`duplicate_member`, `invalid_number`); `member` names the run_context member."""

    reason: str
    member: str = ""


class RunOwner(NamedTuple):
    """Who a run belongs to, from its `run_context`: nobody when no identity was bound into it.
    A tuple: one is made for every run the gateway looks up."""

    issuer: str | None
    subject: str | None
    tenant: str | None

    @classmethod
    def of(cls, context: Any) -> RunOwner:
        """The owner named by a Run's (or a RunStartRequest's) `run_context` member."""
        if context.__class__ is not dict:
            return NOBODY
        identity = context.get("identity")
        iss = sub = None
        if identity.__class__ is dict:
            iss, sub = identity.get("iss"), identity.get("sub")
        tenant = context.get("tenant_id")
        # tuple.__new__ directly: the NamedTuple's own __new__ is one more Python frame per lookup.
        return _TUPLE_NEW(cls, (iss if iss.__class__ is str else None, sub if sub.__class__ is str else None,
                                tenant if tenant.__class__ is str else None))


class RunHead(msgspec.Struct, gc=False):
    """The members of a coordinator's Run the gateway reads: its id and whom it belongs to. Either
    is None when the answer lacks it (or says null)."""

    run_id: Any = None
    run_context: Any = None


# msgspec builds objects for these two members alone and only checks that the rest is JSON, where
# a full parse (orjson, json) builds every member of an answer just to read two of them.
_READ_HEAD = msgspec.json.Decoder(RunHead).decode


def read_run(body: bytes) -> RunHead | None:
    """A coordinator answer's run_id and run_context; None when it is not a JSON object. What msgspec
    refuses and json accepts (NaN, 1e400 inside run_context, lone surrogates) is read by json, so an
    answer json reads is read the same: the last of a repeated member counts in both."""
    try:
        return _READ_HEAD(body)
    except msgspec.DecodeError:   # its ValidationError too: a member or the document of another type
        pass
    document = _read_json(body)  # rare: answers msgspec refuses
    if document.__class__ is not dict:
        return None
    return RunHead(document.get("run_id"), document.get(_MEMBER))


def _read_json(body: bytes) -> Any:
    """A JSON document as json reads it; None when it is not JSON."""
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


NOBODY = RunOwner(None, None, None)


def trace_ids(traceparent: str | None) -> tuple[str, str] | None:
    """trace-id and parent-id of a valid W3C traceparent (version 00 or later, ids not all zero)."""
    if not traceparent:
        return None
    match = _TRACEPARENT.fullmatch(traceparent.strip())
    if match is None:
        return None
    version, trace_id, span_id = match.groups()
    if version == "ff" or (version == "00" and len(traceparent.strip()) != 55):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id


@dataclass(frozen=True, slots=True)
class BoundCaller:
    """What the gateway writes into the runs one verified caller starts: the same for each of its
    run starts, so it is made once per caller and reused."""

    owner: RunOwner              # iss, sub and tenant, as a run will say them
    context: dict[str, Any]      # the run_context members the gateway decides: identity, actor, tenant_id
    opening: bytes               # `,"run_context":{` those members `,"trace":{"request_id":"`


class RunBinder:
    def __init__(self, *, identity_claims: tuple[str, ...] = (), tenant_claim: str | None = None,
                 overwrite: bool = False) -> None:
        self._claims = identity_claims
        self._tenant_claim = tenant_claim
        self._overwrite = overwrite

    def tenant_of(self, claims: Mapping[str, Any]) -> str | None:
        """The caller's tenant: the configured claim's value, when it is a non-empty string."""
        if self._tenant_claim is None:
            return None
        value = claims.get(self._tenant_claim)
        return value if isinstance(value, str) and value else None

    def caller(self, issuer: str, subject: str, claims: Mapping[str, Any]) -> BoundCaller | BindRefusal:
        """What is bound for this caller; or why it may not start runs."""
        tenant = self.tenant_of(claims)
        if self._tenant_claim is not None and tenant is None:
            return BindRefusal("missing_tenant_claim", "tenant_id")
        identity: dict[str, Any] = {"iss": issuer, "sub": subject}
        for name in self._claims:
            if name in claims and name not in identity:
                identity[name] = claims[name]
        context: dict[str, Any] = {"identity": identity, "actor": {"type": "principal", "id": subject}}
        if tenant is not None:
            context["tenant_id"] = tenant
        try:
            members = _ENCODE(context)[1:-1].encode()
        except ValueError:
            return BindRefusal("invalid_number")  # a NaN claim: not JSON
        return BoundCaller(RunOwner(issuer, subject, tenant), context,
                           b',"run_context":{' + members + b',"trace":{"request_id":"')

    def bind(self, body: bytes, caller: BoundCaller, request_id: str, traceparent: str | None) -> bytes | BindRefusal:
        """The body to forward, with the caller bound into its run_context; or why not. `body` is a
        RunStartRequest the edge has already validated; `request_id` one the edge made or checked
        (letters, digits and `._:-`: nothing to escape in JSON)."""
        ids = trace_ids(traceparent) if traceparent is not None else None
        if _BACKSLASH not in body and _MEMBER_BYTES not in body:
            # No run_context (nor a backslash, so no key spelt with escapes): it goes after the last
            # member, and the body needs no walk. The object is never empty: root_node_type_ref and
            # input are required. Trace ids are lowercase hex: nothing to escape either.
            end = len(body) - 1
            if body[end] != _CLOSE:
                end = body.rstrip().rindex(b"}")
            trace = b'"}}' if ids is None else f'","trace_id":"{ids[0]}","span_id":"{ids[1]}"}}}}'.encode()
            return b"".join((body[:end], caller.opening, request_id.encode(), trace, body[end:]))
        context: dict[str, Any] = {"request_id": request_id}
        if ids is not None:
            context["trace_id"], context["span_id"] = ids
        return self._merged(body.decode("utf-8"), caller.context, context)

    def _merged(self, text: str, wanted: dict[str, Any], trace: dict[str, Any]) -> bytes | BindRefusal:
        """The client sent a run_context: the gateway's members checked against it and merged in."""
        span = _member_span(text, _MEMBER)
        if isinstance(span, BindRefusal):
            return span
        sent: dict[str, Any] = _SCAN(text, span[0])[0] if span is not None else {}
        context = dict(sent)
        for member, value in wanted.items():
            if member in sent and sent[member] != value and not self._overwrite:
                return BindRefusal("run_context_mismatch", member)
            context[member] = value
        if "tenant_id" not in wanted and "tenant_id" in sent:
            # No tenant claim configured: nothing vouches for a client-sent tenant, and the PDP would trust it.
            if not self._overwrite:
                return BindRefusal("run_context_mismatch", "tenant_id")
            del context["tenant_id"]
        sent_trace = sent.get("trace")
        context["trace"] = {**sent_trace, **trace} if sent_trace.__class__ is dict else trace
        try:
            encoded = _ENCODE(context)
        except ValueError:
            return BindRefusal("invalid_number")  # 1e400 in a client member: not representable as JSON again
        if span is None:
            end = text.rstrip().rindex("}")
            return (text[:end] + ',"' + _MEMBER + '":' + encoded + text[end:]).encode()
        return (text[:span[0]] + encoded + text[span[1]:]).encode()


def _member_span(text: str, name: str) -> tuple[int, int] | None | BindRefusal:
    """Where the value of the top-level member `name` starts and ends in a JSON object's text; None
    when it is absent. A name that occurs twice is refused: parsers disagree on which one counts."""
    found: tuple[int, int] | None = None
    i = _WS.match(text, 0).end()  # type: ignore[union-attr]
    i += 1  # the "{"
    while True:
        i = _WS.match(text, i).end()  # type: ignore[union-attr]
        if text[i] == "}":
            return found
        key, i = scanstring(text, i + 1)
        i = _WS.match(text, i).end() + 1  # type: ignore[union-attr]  # past ":"
        i = _WS.match(text, i).end()  # type: ignore[union-attr]
        _, end = _SCAN(text, i)
        if key == name:
            if found is not None:
                return BindRefusal("duplicate_member", name)
            found = (i, end)
        i = _WS.match(text, end).end()  # type: ignore[union-attr]
        if text[i] == ",":
            i += 1
