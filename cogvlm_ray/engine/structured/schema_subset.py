"""The JSON Schema subset we accept: keywords xgrammar 0.2.8 would silently not enforce are a 400.

xgrammar compiles most of JSON Schema into its grammar, but some keywords it ignores (or only
approximates) and merely logs a warning for; an output could then fail `jsonschema` validation.
Rather than return such output, `check_supported(schema)` refuses the schema up front, naming the
keyword and where it is. Each entry below was checked against xgrammar 0.2.8 (an output that
violates the keyword is accepted by its grammar); docs/structured-output.md lists the subset.
"""

from __future__ import annotations

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
    for key in _SCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items() if isinstance(schema.get(key), dict) else ():
            check_supported(sub, f"{path}.{key}.{name}", param)
    for key in _SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or ()) if isinstance(schema.get(key), list) else ():
            check_supported(sub, f"{path}.{key}[{i}]", param)
    for key in _SCHEMA_VALUES:
        if key in schema:
            check_supported(schema[key], f"{path}.{key}", param)


def _refuse(where: str, reason: str, param: str) -> None:
    raise GrammarError(f"unsupported JSON schema at {where}: {reason}", param=param)
