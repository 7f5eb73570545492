"""Cloudflare D1 as a write target for read-only reference tables (issue 8): the REST API client,
the Postgres → SQLite type mapping, schema export and diff, row writes, and the local D1 server
used by tests and the demo."""
