"""What operators see: Prometheus metrics, the per-request observer, the access log, JSON logs."""
