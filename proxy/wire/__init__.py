"""Sans-IO Postgres v3 protocol codec: framing, messages, startup and authentication."""
