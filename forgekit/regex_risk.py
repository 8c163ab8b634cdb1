"""Refusing regular expressions that can backtrack catastrophically: Python's `re` has no time
limit, and recipe regexes run over every tensor name of a source."""

from __future__ import annotations

from typing import Optional

import re

try:  # the parser behind `re`, to inspect a pattern's structure
    import re._constants as sre
    import re._parser as sre_parse
except ImportError:  # Python < 3.11
    import sre_constants as sre  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]


MAX_WIDE_REPEATS = 3
_REPEATS = {sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", sre.MAX_REPEAT)}


def backtracking_risk(pattern: str) -> Optional[str]:
    """Why matching `pattern` may backtrack catastrophically, or None. Python's `re` has no
    time limit, so risky shapes are refused when the recipe loads:

    - a repeat of unbounded count whose body holds another repeat (`(a+)+`, `(a*)*`, `(\\w+\\.?)*`):
      the ways to split a string between the two grow exponentially with its length;
    - an unbounded repeat over alternatives that can start with the same character (`(a|a)*`,
      `(a|ab)+`): same blow-up;
    - more than MAX_WIDE_REPEATS unbounded repeats of a wide atom (`.`, `[^x]`, `\\w`...):
      the work grows as (name length) ** count; with tensor names capped at 512 characters (sources.base.MAX_NAME)
      three stay in milliseconds, four can take seconds per name.
    Real remap rules (`model\\.layers\\.(\\d+)\\..*`) have none of these."""
    try:
        parsed = sre_parse.parse(pattern)
    except re.error:
        return None
    wide = 0

    def walk(items, under_unbounded: bool) -> Optional[str]:
        nonlocal wide
        for op, av in items:
            if op in _REPEATS:
                lo, hi, body = av
                if under_unbounded and hi > 1:
                    return "a quantifier nested inside an unbounded quantifier"
                unbounded = hi == sre.MAXREPEAT
                if unbounded and _is_wide(body):
                    wide += 1
                if unbounded and _ambiguous_branches(body):
                    return "alternatives under an unbounded quantifier that can match the same text"
                found = walk(body, under_unbounded or (unbounded and hi > 1))
            elif op == sre.SUBPATTERN:
                found = walk(av[-1], under_unbounded)
            elif op == sre.BRANCH:
                found = next(filter(None, (walk(b, under_unbounded) for b in av[1])), None)
            elif op in (sre.ASSERT, sre.ASSERT_NOT):
                found = walk(av[1], under_unbounded)
            else:
                found = None
            if found:
                return found
        return None

    found = walk(parsed, False)
    if found:
        return found
    if wide > MAX_WIDE_REPEATS:
        return f"{wide} unbounded repeats of a wide pattern such as '.*'; at most {MAX_WIDE_REPEATS}"
    return None


def _is_wide(body) -> bool:
    """Whether a repeated body can match many different characters (`.`, `[^x]`, `\\w`, `\\S`)."""
    if len(body) != 1:
        return any(_is_wide([item]) for item in body)
    op, av = body[0]
    if op in (sre.ANY, sre.NOT_LITERAL):
        return True
    if op == sre.IN:
        return any(o in (sre.NEGATE, sre.CATEGORY) and a is not sre.CATEGORY_DIGIT for o, a in av)
    if op == sre.SUBPATTERN:
        return _is_wide(av[-1])
    return False


def _char_sets(items) -> list[set]:
    """Per position, the characters a branch can have there, up to its first item that is
    not a plain character or character class."""
    out = []
    for op, av in items:
        if op == sre.LITERAL:
            out.append({av})
        elif op == sre.IN and all(o in (sre.LITERAL, sre.RANGE) for o, _ in av):
            chars: set = set()
            for o, a in av:
                chars |= {a} if o == sre.LITERAL else set(range(a[0], min(a[1], a[0] + 4096) + 1))
            out.append(chars)
        else:
            break
    return out


def _distinct(a: list[set], b: list[set]) -> bool:
    """Whether two branches can never match the same text: at some position both have a plain
    character and the characters differ."""
    return any(not (x & y) for x, y in zip(a, b))


def _ambiguous_branches(body) -> bool:
    """Whether a repeated body holds an alternation whose branches may start alike (the parser
    factors common prefixes out: `(a|ab)` arrives as `a(?:|b)`, an empty branch)."""
    for op, av in body:
        if op == sre.SUBPATTERN and _ambiguous_branches(av[-1]):
            return True
        if op == sre.BRANCH:
            sets = [_char_sets(branch) for branch in av[1]]
            if any(not _distinct(x, y) for n, x in enumerate(sets) for y in sets[n + 1:]):
                return True
    return False
