"""pgshift: a Postgres wire-protocol proxy for zero-downtime database migrations."""

__version__ = "0.1.0"
