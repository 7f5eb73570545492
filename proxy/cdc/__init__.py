"""Change data capture from a source Postgres: logical replication on our own wire codec (pgoutput)."""
