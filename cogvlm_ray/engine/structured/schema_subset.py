"""The JSON Schema subset we accept, and the one rewrite we apply before xgrammar compiles it.

`check_supported(schema)`: xgrammar 0.2.8 compiles most of JSON Schema into its grammar, but some
keywords it ignores (or only approximates) and merely logs a warning for; an output could then
fail `jsonschema` validation. Rather than return such output, those schemas are a 400 naming the
keyword and where it is. Each entry below was checked against xgrammar 0.2.8 (an output that
violates the keyword is accepted by its grammar); docs/structured-output.md lists the subset.

`rewrite_for_grammar(schema)`: xgrammar writes `minLength` / `maxLength` strings as a repeat of a
character class that (a) lets raw control characters in, which `json.loads(strict=True)`
rejects, and (b) above 128 repetitions allows tokens in the mask that its matcher then rejects.
Its `pattern` strings have neither problem, so length bounds become the equivalent pattern
`^.{min,max}$` (in xgrammar's JSON-string regex `.` is one unescaped character). Only the grammar
sees the rewrite; outputs are validated against the schema as sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cogvlm_ray.errors import GrammarError

#: keyword -> why it is refused.
UNSUPPORTED = {
    "not": "'not' is not enforced by the grammar backend",
    "if": "'if' / 'then' / 'else' are not enforced by the grammar backend",
    "then": "'if' / 'then' / 'else' are not enforced by the grammar backend",
    "else": "'if' / 'then' / 'else' are not enforced by the grammar backend",
    "dependentRequired": "'dependentRequired' is not enforced by the grammar backend",
    "dependentSchemas": "'dependentSchemas' is not enforced by the grammar backend",
    "dependencies": "'dependencies' is not enforced by the grammar backend",
    "contains": "'contains' is not enforced by the grammar backend",
    "minContains": "'minContains' is not enforced by the grammar backend",
    "maxContains": "'maxContains' is not enforced by the grammar backend",
    "unevaluatedProperties": "'unevaluatedProperties' is not enforced; use additionalProperties",
    "unevaluatedItems": "'unevaluatedItems' is not enforced; use items",
    "oneOf": "'oneOf' is only approximated (as anyOf); use anyOf",
}

#: Keywords whose values are subschemas (a dict of them, a list of them, or one).
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "propertyNames", "additionalItems")


def check_supported(schema: Any, path: str = "schema", param: str = "response_format.json_schema") -> None:
    """Raise GrammarError (400, `param`) naming the first unsupported keyword found in `schema`."""
    if not isinstance(schema, dict):
        return  # booleans are schemas too; anything else the compiler reports itself
    for keyword, reason in UNSUPPORTED.items():
        if keyword in schema:
            _refuse(f"{path}.{keyword}", reason, param)
    if schema.get("uniqueItems") is True:
        _refuse(f"{path}.uniqueItems", "'uniqueItems: true' is not enforced by the grammar backend", param)
    if ("pattern" in schema or "format" in schema) and ("minLength" in schema or "maxLength" in schema):
        _refuse(
            f"{path}.maxLength" if "maxLength" in schema else f"{path}.minLength",
            "minLength / maxLength cannot be combined with pattern or format; "
            "put the length into the pattern (e.g. ^[a-z]{2,8}$)",
            param,
        )
    if len(schema.get("allOf", ())) > 1:
        _refuse(f"{path}.allOf", "'allOf' with more than one schema is not enforced; merge them", param)
    for where, sub in _subschemas(schema, path):
        check_supported(sub, where, param)


def rewrite_for_grammar(schema: Any) -> Any:
    """A copy of `schema` with plain length-bounded strings turned into patterns (see above)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            out[key] = {name: rewrite_for_grammar(sub) for name, sub in schema[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            out[key] = [rewrite_for_grammar(sub) for sub in schema[key]]
    for key in _SCHEMA_VALUES:
        if key in schema:
            out[key] = rewrite_for_grammar(schema[key])
    bounded = "minLength" in schema or "maxLength" in schema
    if bounded and "pattern" not in schema and "format" not in schema:
        low, high = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        out["pattern"] = f"^.{{{low},{'' if high is None else int(high)}}}$"
    return out


def _subschemas(schema: dict[str, Any], path: str) -> Iterator[tuple[str, Any]]:
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                yield f"{path}.{key}.{name}", sub
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                yield f"{path}.{key}[{i}]", sub
    for key in _SCHEMA_VALUES:
        if key in schema:
            yield f"{path}.{key}", schema[key]


def _refuse(where: str, reason: str, param: str) -> None:
    raise GrammarError(f"unsupported JSON schema at {where}: {reason}", param=param)
