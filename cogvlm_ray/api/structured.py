"""OpenAI structured-output fields -> the engine's `StructuredOutputSpec` (one per request).

Sources, at most one per request (two give a 400):
- `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}` (any JSON
  object), `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`;
- vLLM's extensions `guided_json` (a schema), `guided_regex`, `guided_choice`;
- `tools` with `tool_choice`: "required" or `{"type": "function", "function": {"name"}}` force
  a call `{"name": ..., "arguments": {...}}` (JSON schema: the name is a const, the arguments
  are the function's `parameters`); "auto" (the default with tools) leaves the answer free text
  but, once the model writes `<tool_call>`, forces a call and then `</tool_call>` (structural
  tag); "none" adds no constraint. How calls are parsed back and streamed: `api/tool_calls.py`.

Only shapes are checked here (400s naming the field); the schema itself is checked against the
supported subset and compiled by the engine (`engine/structured/`), whose errors are 400s naming
the field each spec came from (`StructuredOutputSpec.param`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from cogvlm_ray.contracts import StructuredOutputSpec
from cogvlm_ray.errors import InvalidRequestError

TOOL_CALL_BEGIN = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

ToolMode = Literal["none", "forced", "auto"]


@dataclass(frozen=True)
class StructuredRequest:
    """What the API layer decided: the engine spec, and how to read the output back."""

    spec: StructuredOutputSpec | None = None
    tool_mode: ToolMode = "none"
    tools: list[dict[str, Any]] = field(default_factory=list)
    """The request's function definitions (name, description, parameters), for the prompt."""


def _invalid(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="invalid_request_error")


def canonical_json(value: Any) -> str:
    """Compact JSON keeping key order (property order is generation order)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def response_format_spec(response_format: dict[str, Any] | None) -> StructuredOutputSpec | None:
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputSpec("json_object")
    if kind == "json_schema":
        body = response_format.get("json_schema")
        if not isinstance(body, dict):
            raise _invalid("response_format.json_schema must be an object", "response_format.json_schema")
        schema = body.get("schema")
        if schema is None:
            raise _invalid(
                "response_format.json_schema.schema is required", "response_format.json_schema.schema"
            )
        if not isinstance(schema, (dict, bool)):
            raise _invalid(
                "response_format.json_schema.schema must be a JSON schema object",
                "response_format.json_schema.schema",
            )
        return StructuredOutputSpec(
            "json_schema", canonical_json(schema), "response_format.json_schema.schema"
        )
    raise _invalid(
        f"response_format.type {kind!r} is not supported (use text, json_object or json_schema)",
        "response_format.type",
    )


def guided_spec(
    guided_json: Any = None, guided_regex: str | None = None, guided_choice: list[str] | None = None
) -> StructuredOutputSpec | None:
    """vLLM's request extensions (at most one)."""
    given = [name for name, v in (("guided_json", guided_json), ("guided_regex", guided_regex),
                                  ("guided_choice", guided_choice)) if v is not None]  # fmt: skip
    if len(given) > 1:
        raise _invalid(f"send only one of {', '.join(given)}", given[1])
    if guided_json is not None:
        try:
            schema = json.loads(guided_json) if isinstance(guided_json, str) else guided_json
        except json.JSONDecodeError as exc:
            raise _invalid(f"guided_json is not valid JSON: {exc}", "guided_json") from None
        if not isinstance(schema, (dict, bool)):
            raise _invalid("guided_json must be a JSON schema object", "guided_json")
        return StructuredOutputSpec("json_schema", canonical_json(schema), "guided_json")
    if guided_regex is not None:
        if not guided_regex:
            raise _invalid("guided_regex must be a non-empty regular expression", "guided_regex")
        return StructuredOutputSpec("regex", guided_regex)
    if guided_choice is not None:
        if not guided_choice or not all(isinstance(c, str) and c for c in guided_choice):
            raise _invalid("guided_choice must be a non-empty list of non-empty strings", "guided_choice")
        return StructuredOutputSpec("choice", canonical_json(list(guided_choice)))
    return None


def function_definitions(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validated `tools[i].function` objects with `parameters` defaulted to an empty object."""
    functions = []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise _invalid(f"tools[{i}].type must be 'function'", f"tools[{i}].type")
        function = tool.get("function")
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            raise _invalid(f"tools[{i}].function.name is required", f"tools[{i}].function.name")
        if function["name"] in names:
            raise _invalid(
                f"tools[{i}].function.name {function['name']!r} is repeated", f"tools[{i}].function.name"
            )
        names.add(function["name"])
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise _invalid(
                f"tools[{i}].function.parameters must be a JSON schema object",
                f"tools[{i}].function.parameters",
            )
        functions.append({**function, "parameters": parameters})
    return functions


def call_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON schema of one call `{"name": ..., "arguments": {...}}` to any of `functions`."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"],
        }
        for f in functions
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_spec(
    tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None
) -> StructuredRequest:
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise _invalid("tool_choice needs tools", "tool_choice")
        return StructuredRequest()
    functions = function_definitions(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return StructuredRequest()
    if choice == "required":
        chosen = functions
    elif isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise _invalid(f"tool_choice names a function not in tools: {name!r}", "tool_choice")
    elif choice == "auto":
        tag = {
            "type": "tag",
            "begin": TOOL_CALL_BEGIN,
            "content": {
                "type": "json_schema",
                "json_schema": call_schema(functions),
                "max_whitespace_cnt": 1,
            },
            "end": TOOL_CALL_END,
        }
        structural = {
            "type": "structural_tag",
            "format": {
                "type": "triggered_tags",
                "triggers": [TOOL_CALL_BEGIN],
                "tags": [tag],
                "stop_after_first": True,
            },
        }
        return StructuredRequest(
            StructuredOutputSpec("structural_tag", canonical_json(structural), "tools"), "auto", functions
        )
    else:
        raise _invalid("tool_choice must be 'none', 'auto', 'required' or a named function", "tool_choice")
    spec = StructuredOutputSpec("json_schema", canonical_json(call_schema(chosen)), "tools")
    return StructuredRequest(spec, "forced", functions)


def structured_request(
    *,
    response_format: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
    guided_json: Any = None,
    guided_regex: str | None = None,
    guided_choice: list[str] | None = None,
) -> StructuredRequest:
    """The one structured-output decision for a request; 400 when two sources conflict."""
    tool_request = tool_spec(tools, tool_choice)
    candidates = [
        ("response_format", response_format_spec(response_format)),
        ("guided_*", guided_spec(guided_json, guided_regex, guided_choice)),
    ]
    given = [(name, spec) for name, spec in candidates if spec is not None]
    if tool_request.tool_mode == "forced":
        given.append(("tool_choice", tool_request.spec))
    if len(given) > 1:
        raise _invalid(
            f"{given[0][0]} and {given[1][0]} both constrain the output; send one of them", given[1][0]
        )
    if given and given[0][0] != "tool_choice":
        # tools under "auto" with another constraint: the constraint wins, tools stay in the prompt.
        return StructuredRequest(given[0][1], "none", tool_request.tools)
    return tool_request
