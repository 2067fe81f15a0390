"""Property tests for configuration loading: any YAML either loads or fails naming a key, never a traceback.

An operator's typo must stop the start-up with `key.path: problem` lines
(exit 2), not a Python stack trace that hides which key was wrong.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.settings.config import ConfigError, GatewayConfig, build_config, load_config

# `section.key`, `auth.issuers[0].audiences`, `<root>`, `--config`, optionally `(from ENV)`, then `: why`.
PROBLEM = re.compile(r"^(?P<path>\S.*?)( \(from [^)]+\))?: \S")
KNOWN_TOP = {f.name for f in dataclasses.fields(GatewayConfig)} | {"<root>", "--config"}


def names_a_key(line: str, raw: typing.Any = None) -> bool:
    """The line starts with a key path whose first part is a section the gateway knows or a key
    the input really has (an unknown key is named as written)."""
    match = PROBLEM.match(line)
    if not match:
        return False
    path = match["path"]
    given = {str(k) for k in raw} | {repr(str(k)) for k in raw} if isinstance(raw, dict) else set()
    return any(path == top or path.startswith((top + ".", top + "[")) for top in KNOWN_TOP | given)

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**300, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["", "0", "-1", "1e999", "nan", "true", "http://127.0.0.1:1", "RS256", "disabled", "x" * 300]),
)
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=3),
                    max_leaves=8)


def _tree(cls: type) -> dict[str, typing.Any]:
    """The config's own shape, to draw mostly-known keys with arbitrary values."""
    hints = typing.get_type_hints(cls)
    tree: dict[str, typing.Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(hint):
            tree[f.name] = _tree(hint)
        elif inner:
            tree[f.name] = _tree(inner[0])
        elif typing.get_origin(hint) is tuple and any(dataclasses.is_dataclass(a) for a in typing.get_args(hint)):
            tree[f.name] = [_tree(next(a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)))]
        else:
            tree[f.name] = None
    return tree


TREE = _tree(GatewayConfig)


def shaped(tree: typing.Any) -> st.SearchStrategy:
    if tree is None:
        return JUNK
    if isinstance(tree, list):
        return st.one_of(JUNK, st.lists(shaped(tree[0]), max_size=2))
    keys = sorted(tree)
    return st.one_of(JUNK, st.fixed_dictionaries({}, optional={k: shaped(tree[k]) for k in keys}).flatmap(
        lambda d: st.dictionaries(st.sampled_from(["bogus", "Listen", "port "]), JUNK, max_size=1).map(
            lambda extra: {**d, **extra})))


def check(raw: typing.Any) -> None:
    try:
        cfg = build_config(raw)
    except ConfigError as exc:
        assert exc.problems, "a ConfigError must say what is wrong"
        for line in exc.problems:
            assert names_a_key(line, raw), f"problem without a key path: {line!r}"
    else:
        assert isinstance(cfg, GatewayConfig)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(raw=shaped(TREE))
@example(raw={"listen": {"port": 10**400}})
@example(raw={"listen": {"workers": 1e999}})
@example(raw={"upstream": {"max_connections": "1e5"}})
@example(raw={"auth": {"mode": "disabled", "claim_headers": {1: "X-A"}}})
@example(raw={"auth": {"mode": "disabled", "rules": [{"path": "/v1/runs", "claims": {1: 2}, "methods": [1]}]}})
@example(raw={"auth": {"mode": "disabled", "exempt_paths": [None]}})
@example(raw={"auth": {"issuers": [{"issuer": "x", "audiences": "a", "algorithms": "HS256,RS256"}]}})
@example(raw={"limits": {"run_start_rate": {"per_second": 10**400, "burst": 10**400}}})
@example(raw={"limits": {"run_start_rate": []}})
@example(raw=[])
@example(raw="text")
def test_any_structure_builds_or_fails_naming_the_key(raw):
    check(raw)


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(text=st.one_of(st.text(max_size=200), JUNK.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
                      shaped(TREE).map(lambda v: yaml.safe_dump(v, allow_unicode=True))))
@example(text="listen: {port: [}")
@example(text="!!python/object/apply:os.system ['true']")
@example(text="a: &x [*x]")
@example(text="\x00")
@example(text="- 1\n- 2")
@example(text="listen: {port: " + "9" * 5000 + "}")
@example(text="[" * 5000 + "]" * 5000)
def test_any_yaml_file_loads_or_fails_naming_the_key(tmp_path: Path, text: str):
    path = tmp_path / "gateway.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        raw = yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - only used to know which keys the file named
        raw = None
    try:
        cfg = load_config(path, {})
    except ConfigError as exc:
        for line in exc.problems:
            assert names_a_key(line, raw), f"problem without a key path: {line!r}"
    else:
        assert isinstance(cfg, GatewayConfig)


def test_a_file_that_is_not_utf8_fails_naming_the_flag(tmp_path: Path):
    path = tmp_path / "gateway.yaml"
    path.write_bytes(b"listen:\n  host: \xff\xfe\n")
    try:
        load_config(path, {})
    except ConfigError as exc:
        assert exc.problems[0].startswith("--config: ")
    else:
        raise AssertionError("invalid UTF-8 was accepted")


@settings(max_examples=100, deadline=None, database=None)
@given(env=st.dictionaries(st.sampled_from([
    "JARVIS_RUN_COORDINATOR_URL", "ARP_AUTH_PROFILE", "ARP_AUTH_MODE", "ARP_AUTH_ISSUER", "ARP_AUTH_AUDIENCE",
    "ARP_AUTH_JWKS_URI", "ARP_AUTH_ALGORITHMS", "ARP_AUTH_CLOCK_SKEW_SECONDS", "ARP_AUTH_EXEMPT_PATHS",
    "ARP_AUTH_CLIENT_ID", "ARP_AUTH_TOKEN_ENDPOINT", "LOG_LEVEL"]), st.text(st.characters(codec="utf-8",
                                                                                          exclude_characters="\x00"),
                                                                             max_size=30), max_size=5))
def test_any_environment_loads_or_fails_naming_the_key(env):
    try:
        load_config(None, env)
    except ConfigError as exc:
        for line in exc.problems:
            assert names_a_key(line), f"problem without a key path: {line!r}"
