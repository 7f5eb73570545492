"""Dual write: capture committed writes on the primary, apply them in order on every mirror (DESIGN.md §4)."""
