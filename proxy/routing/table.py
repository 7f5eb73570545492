"""The routing table: config's read weights and rules compiled for fast, allocation-free choices."""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.config import RoutingConfig


@dataclass(frozen=True, slots=True)
class WeightedChoice:
    """Backends with integer weights; ``pick`` draws one in proportion (zero weight: never)."""

    names: tuple[str, ...]
    cumulative: tuple[int, ...]

    @classmethod
    def of(cls, weights: dict[str, int]) -> WeightedChoice:
        names, cumulative, total = [], [], 0
        for name, weight in sorted(weights.items()):
            if weight > 0:
                total += weight
                names.append(name)
                cumulative.append(total)
        return cls(tuple(names), tuple(cumulative))

    def pick(self, rng: random.Random) -> str:
        if len(self.names) == 1:
            return self.names[0]
        # random() is one C call; randrange() costs several Python frames (measured: 5x slower).
        return self.names[bisect.bisect_right(self.cumulative, rng.random() * self.cumulative[-1])]


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    tables: frozenset[str] | None
    users: frozenset[str] | None
    application_names: frozenset[str] | None
    reads: WeightedChoice
    sticky: bool  # one backend per client session, drawn once by weight
    specificity: int  # how many kinds of criteria it names (the most specific matching rule wins)

    def matches(self, tables: frozenset[str], user: str, application_name: str) -> bool:
        if self.tables is not None and not (tables and tables <= self.tables):
            return False
        if self.users is not None and user not in self.users:
            return False
        return self.application_names is None or application_name in self.application_names


def _bare(name: str) -> str:
    """`public.cities` and `cities` name the same table for matching (lowercased already)."""
    return name.rsplit(".", 1)[-1]


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Immutable; a config change builds a new one and sessions pick it up at their next request."""

    primary: str
    mirrors: tuple[str, ...]
    backends: frozenset[str]
    default: WeightedChoice
    default_sticky: bool
    rules: tuple[Rule, ...]  # most specific first; ties keep the order of the config file
    primary_only: bool = False  # every weight (default and rules) names only the primary

    @classmethod
    def build(cls, routing: RoutingConfig, backends: Iterable[str]) -> RoutingTable:
        rules = []
        for name, rule in zip(routing.rule_names(), routing.rules, strict=True):
            criteria = (rule.tables, rule.users, rule.application_names)
            rules.append(
                Rule(
                    name=name,
                    tables=frozenset(_bare(t.lower()) for t in rule.tables) if rule.tables else None,
                    users=frozenset(rule.users) if rule.users else None,
                    application_names=frozenset(rule.application_names) if rule.application_names else None,
                    reads=WeightedChoice.of(rule.reads),
                    sticky=rule.sticky == "session",
                    specificity=sum(1 for c in criteria if c),
                )
            )
        rules.sort(key=lambda r: -r.specificity)  # stable: equal specificity keeps file order
        default = WeightedChoice.of(routing.reads or {routing.primary: 1})
        return cls(
            primary=routing.primary,
            mirrors=tuple(routing.mirrors),
            backends=frozenset(backends),
            default=default,
            default_sticky=routing.sticky == "session",
            rules=tuple(rules),
            primary_only=all(c.names == (routing.primary,) for c in (default, *(r.reads for r in rules))),
        )

    @property
    def splits_reads(self) -> bool:
        """False when every read lands on the primary anyway (but for /* pgshift:route=… */ hints)."""
        return not self.primary_only

    def bare_tables(self, tables: frozenset[str]) -> frozenset[str]:
        return frozenset(_bare(t) for t in tables)
