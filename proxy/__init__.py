"""ARP Standard Run Gateway: a streaming, bearer-authenticating sidecar in front of a Run Coordinator."""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "arp-run-gateway"

try:
    # Single source: `[project] version` in pyproject.toml, read from the installed metadata.
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["DISTRIBUTION", "__version__"]
