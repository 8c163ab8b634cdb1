"""Rule tables -> name mapping, with the coverage checks that make a table trustworthy.

Rules are tried in order and the first full match wins. Every source tensor must
be mapped or dropped by a named rule, and every non-optional rule must match. A `split`
rule maps one source tensor to several outputs (one Mapped per part), a `stack` rule maps
numbered source tensors to one output (one Mapped per source, carrying its index); plan/combine.py
turns those into output tensors with all their sources.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..recipe import RemapRule


@dataclass(frozen=True)
class Mapped:
    source_key: str
    output_key: str
    rule: RemapRule
    part: tuple[int, int] | None = None   # split: (this part, number of parts)
    index: str | None = None              # stack: the number in the source name, as written


@dataclass
class TableResult:
    mapped: list[Mapped]
    dropped: dict[str, str]          # source key -> rule name
    unmatched_keys: list[str]        # source tensors no rule covers
    unused_rules: list[RemapRule]    # non-optional rules that matched nothing


def compile_rule(rule: RemapRule, placeholders: dict[str, str]) -> re.Pattern:
    pattern = rule.match
    for name, value in placeholders.items():
        pattern = pattern.replace("{" + name + "}", value)
    return re.compile(pattern)


class Table:
    def __init__(self, rules: tuple[RemapRule, ...], placeholders: dict[str, str] | None = None):
        self.rules = rules
        self.patterns = [compile_rule(r, placeholders or {}) for r in rules]

    def first_match(self, key: str) -> tuple[RemapRule, re.Match] | None:
        for rule, pattern in zip(self.rules, self.patterns):
            m = pattern.fullmatch(key)
            if m:
                return rule, m
        return None

    def keeps(self, key: str) -> bool:
        """Whether the plan needs this tensor's bytes (matched by a non-drop rule)."""
        hit = self.first_match(key)
        return hit is not None and not hit[0].drop

    def apply(self, keys: list[str]) -> TableResult:
        result = TableResult([], {}, [], [])
        used: set[str] = set()
        for key in keys:
            hit = self.first_match(key)
            if hit is None:
                result.unmatched_keys.append(key)
                continue
            rule, m = hit
            used.add(rule.name)
            if rule.drop:
                result.dropped[key] = rule.name
            elif rule.split:
                parts = len(rule.split.to)
                result.mapped.extend(Mapped(key, m.expand(to), rule, part=(j, parts))
                                     for j, to in enumerate(rule.split.to))
            elif rule.stack:
                index = m.group(rule.stack.index) if rule.stack.index <= len(m.groups()) else None
                result.mapped.append(Mapped(key, m.expand(rule.stack.to), rule, index=index))
            else:
                result.mapped.append(Mapped(key, m.expand(rule.to), rule))
        result.unused_rules = [r for r in self.rules if r.name not in used and not r.optional]
        return result
