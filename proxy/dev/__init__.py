"""Dev-only parts: an in-memory Run Coordinator (`coordinator`) and a token issuer (`issuer`) for
`arp-gateway dev` and `arp-gateway token`. `serve` never imports them; the command line imports
them only when one of those commands runs, so these constants live apart from their aiohttp apps."""

ISSUER_AUDIENCE = "arp-run-gateway"
ISSUER_PORT = 8089
