"""A routing version: one immutable, audited routing document, and what changed from its parent."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from proxy.config import RoutingConfig
from proxy.errors import ConfigError


@dataclass(frozen=True, slots=True)
class RoutingVersion:
    version: int
    routing: RoutingConfig
    source: str  # config | reload | put | patch | flip | rollback
    caller: str  # who asked: "config.toml", or the admin client's address and stated name
    note: str = ""
    parent: int | None = None  # the version it replaced ("before")
    created_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "routing": dump_routing(self.routing),
            "source": self.source,
            "caller": self.caller,
            "note": self.note,
            "parent": self.parent,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoutingVersion:
        try:
            return cls(
                version=int(data["version"]),
                routing=RoutingConfig.model_validate(data["routing"]),
                source=str(data["source"]),
                caller=str(data["caller"]),
                note=str(data.get("note") or ""),
                parent=None if data.get("parent") is None else int(data["parent"]),
                created_at=float(data["created_at"]),
            )
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            raise ConfigError(f"stored routing version is unreadable: {exc}") from None


def dump_routing(routing: RoutingConfig) -> dict[str, Any]:
    """The JSON form (the shape of [routing] in config.toml), without unset optional criteria."""
    data: dict[str, Any] = routing.model_dump(mode="json", exclude_none=True)
    return data


def _weights(weights: dict[str, int] | None) -> str:
    if not weights:
        return "(all on primary)"
    return " ".join(f"{k}={v}" for k, v in sorted(weights.items()))


def describe_change(before: RoutingConfig | None, after: RoutingConfig) -> list[str]:
    """Human-readable differences, for the audit trail and `pgshift history`."""
    if before is None:
        return [f"initial: primary {after.primary}, reads {_weights(after.reads)}"]
    out = []
    if before.primary != after.primary:
        out.append(f"primary {before.primary} -> {after.primary}")
    if before.mirrors != after.mirrors:
        out.append(f"mirrors {before.mirrors or '[]'} -> {after.mirrors or '[]'}")
    if (before.reads or {}) != (after.reads or {}):
        out.append(f"reads {_weights(before.reads)} -> {_weights(after.reads)}")
    if before.sticky != after.sticky:
        out.append(f"sticky {before.sticky} -> {after.sticky}")
    old_rules = {str(r.name): r for r in before.named().rules}
    new_rules = {str(r.name): r for r in after.named().rules}
    for name in sorted(old_rules.keys() - new_rules.keys()):
        out.append(f"rule {name} removed")
    for name, rule in new_rules.items():
        previous = old_rules.get(name)
        if previous is None:
            out.append(f"rule {name} added: reads {_weights(rule.reads)}")
        elif previous != rule:
            if previous.reads != rule.reads:
                out.append(f"rule {name}: reads {_weights(previous.reads)} -> {_weights(rule.reads)}")
            if previous.model_copy(update={"reads": rule.reads}) != rule:
                out.append(f"rule {name}: criteria changed")
    return out or ["no change"]
