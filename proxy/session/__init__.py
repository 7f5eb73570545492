"""Per-client orchestration: the only layer that combines wire, routing and backends."""
