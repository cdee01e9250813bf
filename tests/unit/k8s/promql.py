"""A small PromQL reader for the monitoring tests: which metric names and label names an
expression uses. It is not a full parser; it understands what alert rules and dashboards
contain (selectors, matchers, range and subquery brackets, aggregations with by/without,
vector matching with on/ignoring/group_*, functions, numbers, Grafana `$variables`)."""

from __future__ import annotations

import re

# Words that look like identifiers but are PromQL syntax.
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
     "offset", "atan2", "inf", "nan", "start", "end"}
)  # fmt: skip
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")\s*')
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"(?<![A-Za-z0-9_:])[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?[smhdwy]*(?![A-Za-z0-9_:])")
_IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def without_strings(expr: str) -> str:
    """`expr` with every string literal emptied (so brackets inside label values do not count)."""
    return _STRING.sub('""', expr)


def matchers(expr: str) -> list[tuple[str, str, str]]:
    """(label, operator, value) of every label matcher in `{...}` selectors."""
    out: list[tuple[str, str, str]] = []
    for block in _MATCHERS.findall(_VARIABLE.sub("", expr)):
        for part in _split_matchers(block):
            match = _MATCHER.fullmatch(part)
            if match is None:
                raise ValueError(f"cannot read label matcher {part!r} in {expr!r}")
            out.append((match.group(1), match.group(2), match.group(3)[1:-1]))
    return out


def _split_matchers(block: str) -> list[str]:
    parts, current, in_string = [], "", False
    for char in block:
        if char == '"' and not current.endswith("\\"):
            in_string = not in_string
        if char == "," and not in_string:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


def grouping_labels(expr: str) -> set[str]:
    """Label names in by(...)/without(...)/on(...)/ignoring(...)/group_*(...) clauses."""
    out: set[str] = set()
    for _, labels in _LABEL_LIST.findall(_STRING.sub('""', expr)):
        out |= {label.strip() for label in labels.split(",") if label.strip()}
    return out


def metric_names(expr: str) -> set[str]:
    """Names of the metrics an expression selects."""
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub("", text)
    text = _MATCHERS.sub(" ", text)
    while _BRACKETS.search(text):
        text = _BRACKETS.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names: set[str] = set()
    for name, call in _IDENTIFIER.findall(text):
        if call or name in _KEYWORDS or name.lower() in _KEYWORDS:
            continue  # a function or an aggregation operator, or syntax
        names.add(name)
    return names


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.*?)\s*(?:,\s*([A-Za-z_][A-Za-z0-9_]*)\s*)?\)\s*$", re.S)


def grafana_query_expr(query: str) -> str:
    """The PromQL inside a Grafana template query (`label_values(expr, label)` or plain PromQL)."""
    match = _LABEL_VALUES.match(query)
    return match.group(1) if match else query
