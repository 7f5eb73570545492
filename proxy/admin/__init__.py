"""The admin HTTP API and the Prometheus exporter."""
