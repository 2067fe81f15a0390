"""ARP Standard Run Gateway: a streaming, bearer-authenticating sidecar in front of a Run Coordinator."""

__version__ = "0.1.0"
