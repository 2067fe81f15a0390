"""proxy/auth/principal.py: the scopes a token grants, from `scope` or `scp`."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.auth.principal import scopes_of


@pytest.mark.parametrize("claims, scopes", [
    ({"scope": "runs:read runs:write"}, {"runs:read", "runs:write"}),
    ({"scope": "  runs:read   runs:write "}, {"runs:read", "runs:write"}),
    ({"scp": ["runs:read", "runs:write", 7, None]}, {"runs:read", "runs:write"}),   # non-strings dropped
    ({"scp": "runs:read"}, {"runs:read"}),
    ({"scope": "runs:read", "scp": ["admin"]}, {"runs:read"}),                        # `scope` wins
    ({"scope": 42}, set()),
    ({}, set()),
])
def test_scopes_come_from_scope_or_scp(claims: dict[str, Any], scopes: set[str]) -> None:
    assert scopes_of(claims) == scopes


def test_only_the_space_separates_scopes() -> None:
    # RFC 6749 3.3: a tab or newline stays inside the scope, where the identity check refuses it.
    assert scopes_of({"scope": "runs:read\truns:write admin"}) == {"runs:read\truns:write", "admin"}
