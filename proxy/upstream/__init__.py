"""The way to the Run Coordinator: the keep-alive pool (`pool`), header hygiene (`headers`),
the exchange with its retries (`forwarding`) and the relay of its answers (`relay`)."""

from .forwarding import Upstream, UpstreamFailure, classify
from .headers import HOP_BY_HOP, fold
from .pool import ConnectFailed, PoolBusy, PoolResponse, UpstreamError, UpstreamPool

__all__ = ["HOP_BY_HOP", "ConnectFailed", "PoolBusy", "PoolResponse", "Upstream", "UpstreamError", "UpstreamFailure",
           "UpstreamPool", "classify", "fold"]
