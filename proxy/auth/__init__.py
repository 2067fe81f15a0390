"""Authentication, authorization and identity: from a client's `Authorization` header to what
the coordinator learns about the caller.

Key material per issuer (`jwks_store`: the keys; `jwks_fetch`: one fetch; `jwks_refresh`: when
to fetch), token verification and its cache (`tokens`), access rules (`access`), the
per-request authenticator and its RFC 6750 answers (`authenticator`), identity and token
forwarding (`identity`), RFC 8693 token exchange (`exchange`)."""

from .access import AccessPolicy
from .authenticator import EXEMPT, Authenticator, AuthOutcome, AuthResult
from .exchange import ExchangeFailed, TokenExchanger
from .identity import Identity
from .jwks_refresh import JwksRegistry
from .jwks_store import KeysUnavailable
from .principal import Principal, PrincipalKind
from .tokens import TokenError, TokenVerifier

__all__ = ["EXEMPT", "AccessPolicy", "AuthOutcome", "AuthResult", "Authenticator", "ExchangeFailed", "Identity",
           "JwksRegistry", "KeysUnavailable", "Principal", "PrincipalKind", "TokenError", "TokenExchanger",
           "TokenVerifier"]
