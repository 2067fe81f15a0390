"""The key store: per issuer, the signing keys that verify its tokens and how fresh they are.

Shaped after Envoy's jwt_authn JwksCache (jwks_cache.cc): one entry per
configured issuer, found by the exact (unverified) `iss` of a token. The store
only holds keys; fetching them is `jwks_fetch.py`, deciding when to fetch is
`jwks_refresh.py`.

    store = JwksStore(cfg.auth.issuers, StoreSettings.from_auth(cfg.auth), clock)
    keys = store.find_by_issuer(unverified_iss)        # None -> issuer_mismatch
    key = keys.find_key(kid) if keys.ready else None   # hot path: a dict lookup
    keys.set_keys(imported, ttl_s=300)                 # what a fetch installs
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from joserfc.jwk import Key, OctKey

from ..settings.config import HMAC_ALGORITHMS, AuthConfig, IssuerConfig
from ..util.clock import Clock

# A usable JWK: the JSON it came from (so an unchanged JWK keeps its imported key) and the key.
Imported = tuple[dict[str, Any], Key]


@dataclass(frozen=True, slots=True)
class StoreSettings:
    max_stale_s: float      # keys older than this are not used (auth.jwks_max_stale_s)

    @classmethod
    def from_auth(cls, auth: AuthConfig) -> StoreSettings:
        return cls(max_stale_s=auth.jwks_max_stale_s)


class KeysUnavailable(Exception):
    """No usable keys for this issuer: never fetched, or staler than jwks_max_stale_s.

    Not a token problem: the gateway answers 503 auth_unavailable with Retry-After.
    """

    def __init__(self, issuer: str, retry_after_s: int) -> None:
        super().__init__(f"no usable signing keys for issuer {issuer}")
        self.issuer = issuer
        self.retry_after_s = retry_after_s


class IssuerKeys:
    """The signing keys of one issuer: looked up by kid, expired after their TTL, unusable past max-stale."""

    def __init__(self, issuer: IssuerConfig, settings: StoreSettings, clock: Clock) -> None:
        self.config = issuer
        self.issuer = issuer.issuer
        self._settings = settings
        self._clock = clock
        asym = [a for a in issuer.algorithms if a not in HMAC_ALGORITHMS]
        # The configured secret is the only HMAC key there is: keys from a JWKS are
        # public, so none of them may ever act as an HMAC secret.
        self.hmac_key: OctKey | None = None
        if issuer.hmac_secret and len(asym) < len(issuer.algorithms):
            self.hmac_key = OctKey.import_key(issuer.hmac_secret.encode())
        # An issuer with only HMAC algorithms has nothing to fetch.
        self.needs_fetch = bool(asym)

        self._source: dict[str | None, Imported] = {}
        self._keys: dict[str, Key] = {}
        self._sole: Key | None = None
        self._installed_at: float | None = None    # monotonic
        self._expires_at: float | None = None
        self.last_success: float | None = None     # wall time of the last install, for logs and /metrics

    def find_key(self, kid: str | None) -> Key | None:
        """The key for `kid`; a token without kid gets the key only if the set has exactly one."""
        if kid is None:
            return self._sole
        return self._keys.get(kid)

    def has_kid(self, kid: str | None) -> bool:
        return self.find_key(kid) is not None

    @property
    def keys_count(self) -> int:
        return len(self._source)

    @property
    def imported(self) -> Mapping[str | None, Imported]:
        """The keys held, by kid, with the JWK each came from."""
        return self._source

    def is_expired(self) -> bool:
        """The TTL has passed: time to refetch (the keys are still served until max-stale)."""
        if not self.needs_fetch:
            return False
        return self._expires_at is None or self._clock.monotonic() >= self._expires_at

    @property
    def ready(self) -> bool:
        """Has usable keys that are not older than max_stale_s."""
        if not self.needs_fetch:
            return True
        if self._installed_at is None:
            return False
        return self._clock.monotonic() - self._installed_at <= self._settings.max_stale_s

    def set_keys(self, source: Mapping[str | None, Imported], ttl_s: float) -> None:
        """Replaces the key set (Envoy's setRemoteJwks); fresh for `ttl_s` from now."""
        now = self._clock.monotonic()
        self._source = dict(source)
        self._keys = {kid: key for kid, (_, key) in self._source.items() if kid is not None}
        self._sole = next(iter(self._source.values()))[1] if len(self._source) == 1 else None
        self._installed_at = now
        self._expires_at = now + ttl_s
        self.last_success = self._clock.time()


class JwksStore:
    """One IssuerKeys per configured issuer, found by exact `iss` string."""

    def __init__(self, issuers: Iterable[IssuerConfig], settings: StoreSettings, clock: Clock) -> None:
        self._by_issuer = {i.issuer: IssuerKeys(i, settings, clock) for i in issuers}

    def find_by_issuer(self, iss: str) -> IssuerKeys | None:
        return self._by_issuer.get(iss)

    def __iter__(self) -> Iterator[IssuerKeys]:
        return iter(self._by_issuer.values())

    def __len__(self) -> int:
        return len(self._by_issuer)

    @property
    def ready(self) -> bool:
        return all(k.ready for k in self._by_issuer.values())
