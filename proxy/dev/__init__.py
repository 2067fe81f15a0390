"""Dev-only parts: an in-memory Run Coordinator (`coordinator`) and a token issuer (`issuer`) for
`arp-gateway dev` and `arp-gateway token`. `serve` never imports this package; the command line
imports it only when `dev` runs, so its defaults live in proxy.config, which serve loads anyway."""

from ..settings.config import DEV_ISSUER_AUDIENCE as ISSUER_AUDIENCE
from ..settings.config import DEV_ISSUER_PORT as ISSUER_PORT

__all__ = ["ISSUER_AUDIENCE", "ISSUER_PORT"]
