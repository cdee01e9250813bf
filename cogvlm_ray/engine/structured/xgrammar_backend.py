"""The xgrammar backend: token tables from our HF tokenizer, specs compiled to xgrammar grammars.

JSON configuration, chosen so that every finished output passes `json.loads(strict=True)` and
validates with `jsonschema`:
- `any_whitespace=False`: compact separators (", " and ": "), no free whitespace runs (a random
  model would otherwise spend its tokens on spaces; the output is still plain JSON);
- `strict_mode=True`: properties not in the schema are not generated (additionalProperties and
  extra items default to false), which is a subset of what the schema allows;
- no raw control character inside a string: xgrammar's plain-string rule excludes U+0000..U+001F,
  and its length-bounded strings, which do not, are patched (`_LOOSE_STRING_CHAR`; checked by
  tests/unit/engine/structured/test_xgrammar_backend.py).

xgrammar is imported on first use, so a server that never sees a constrained request never
loads it. Compilation is thread-safe (the manager calls `compile` from its pool).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import torch

from cogvlm_ray.contracts import StructuredOutputSpec
from cogvlm_ray.engine.structured.schema_subset import check_supported, rewrite_for_grammar
from cogvlm_ray.errors import GrammarError

logger = logging.getLogger(__name__)

_PARAMS = {
    "json_object": "response_format",
    "json_schema": "response_format.json_schema.schema",
    "regex": "guided_regex",
    "choice": "guided_choice",
    "structural_tag": "tools",
}

#: xgrammar 0.2.8 writes strings with minLength / maxLength as repeats of this class, which lets
#: raw control characters (U+0000..U+001F) into a string: `json.loads(strict=True)` rejects those.
#: Schemas are rewritten to avoid it; structural tags embed schemas unrewritten, so the compiled
#: EBNF is also patched to use the strict class of xgrammar's plain-string rule.
_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"
_STRICT_STRING_CHAR = r"[^\0-\x1f\"\\\r\n]"

#: xgrammar prefixes its C++ errors with "[hh:mm:ss] /path/file.cc:123: "; clients need the rest.
_LOCATION = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


def clean_error(exc: BaseException) -> str:
    """The first line of a backend error, without its C++ source location."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return _LOCATION.sub("", line)


class XGrammarMatcher:
    """`backend.GrammarMatcher` over one `xgrammar.GrammarMatcher`."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def accept_token(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(token_id))

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())

    def reset(self) -> None:
        self._matcher.reset()


class XGrammarBackend:
    """Compiles specs with one `xgrammar.GrammarCompiler` over the model's vocabulary.

    `vocab_size` is the model's logits width (it may exceed the tokenizer's: padding ids are
    never allowed); `stop_token_ids` are the checkpoint's eos ids, the only way a matcher ends
    (they are allowed exactly where the grammar is complete).
    """

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...], max_threads: int = 1
    ) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        # xgrammar's own cache is off: manager.py owns caching (LRU bound + in-flight dedup).
        self._compiler = xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)

    def compile(self, spec: StructuredOutputSpec) -> Any:
        try:
            return self._compile(spec)
        except GrammarError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own types
            raise GrammarError(
                f"invalid {spec.kind.replace('_', ' ')}: {clean_error(exc)}", param=_param(spec)
            ) from None

    def _compile(self, spec: StructuredOutputSpec) -> Any:
        grammar = self._grammar(spec)
        text = str(grammar)
        strict = text.replace(_LOOSE_STRING_CHAR, _STRICT_STRING_CHAR)
        # Re-parse only when the workaround changed something (the printed EBNF round-trips).
        return self._compiler.compile_grammar(strict if strict != text else grammar)

    def _grammar(self, spec: StructuredOutputSpec) -> Any:
        grammar_cls = self._xgr.Grammar
        if spec.kind == "json_object":
            return grammar_cls.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=True)
        if spec.kind == "json_schema":
            schema = json.loads(spec.value)
            if not isinstance(schema, (dict, bool)):
                raise GrammarError("a JSON schema must be an object", param=_param(spec))
            check_supported(schema, param=_param(spec))
            return grammar_cls.from_json_schema(
                json.dumps(rewrite_for_grammar(schema)), any_whitespace=False, strict_mode=True
            )
        if spec.kind == "regex":
            return grammar_cls.from_regex(spec.value)
        if spec.kind == "choice":
            return grammar_cls.from_ebnf(choice_ebnf(json.loads(spec.value)))
        if spec.kind == "structural_tag":
            tag = json.loads(spec.value)
            _check_and_rewrite_tag_schemas(tag, _param(spec))
            return grammar_cls.from_structural_tag(json.dumps(tag))
        raise GrammarError(f"unknown structured output kind {spec.kind!r}")

    def grammar_num_bytes(self, compiled: Any) -> int:
        return int(compiled.memory_size_bytes)

    def new_matcher(self, compiled: Any) -> XGrammarMatcher:
        return XGrammarMatcher(
            self._xgr.GrammarMatcher(compiled, override_stop_tokens=list(self.stop_token_ids))
        )

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        return self._xgr.allocate_token_bitmask(num_rows, self.vocab_size)


def _param(spec: StructuredOutputSpec) -> str:
    return spec.param or _PARAMS[spec.kind]


def _check_and_rewrite_tag_schemas(node: Any, param: str) -> None:
    """Apply the JSON-schema subset check and rewrite to every schema inside a structural tag."""
    if isinstance(node, dict):
        if node.get("type") == "json_schema" and "json_schema" in node:
            check_supported(node["json_schema"], param=param)
            node["json_schema"] = rewrite_for_grammar(node["json_schema"])
        for value in node.values():
            _check_and_rewrite_tag_schemas(value, param)
    elif isinstance(node, list):
        for value in node:
            _check_and_rewrite_tag_schemas(value, param)


def choice_ebnf(choices: list[str]) -> str:
    """EBNF for exactly one of `choices` (JSON string escapes are valid in xgrammar literals)."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError(
            "guided_choice must be a non-empty list of non-empty strings", param="guided_choice"
        )
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
