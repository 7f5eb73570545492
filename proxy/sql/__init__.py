"""SQL analysis (the only layer that uses pglast): statement kind, tables, functions, session effects, cache."""

from proxy.sql.analysis import Analysis, Kind, Pin, TxOp, analyze
from proxy.sql.cache import AnalysisCache

__all__ = ["Analysis", "AnalysisCache", "Kind", "Pin", "TxOp", "analyze"]
