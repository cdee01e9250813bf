"""Grammar layer without the model: xgrammar backend on the tiny tokenizer, manager, bitmask.

These pin the properties the engine relies on: strict-JSON strings (no raw control characters,
including xgrammar's length-bounded strings), eos allowed only where the grammar is complete,
rollback, clear 400s for bad specs, the LRU bound, shared in-flight compiles and the compile
timeout, and a bitmask that leaves unconstrained rows untouched.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.contracts import SamplingParams, StructuredOutputSpec
from cogvlm_ray.engine.sampling_ops import NEG_INF, apply_token_bitmask
from cogvlm_ray.engine.structured.bitmask import GrammarBitmask
from cogvlm_ray.engine.structured.manager import StructuredOutputManager
from cogvlm_ray.engine.structured.xgrammar_backend import XGrammarBackend
from cogvlm_ray.errors import GrammarError, InvalidRequestError
from cogvlm_ray.model.tiny_tokenizer import write_tokenizer

VOCAB = 768
EOS = (513, 521)


@pytest.fixture(scope="module")
def tokenizer(fixture_dir):
    return PreTrainedTokenizerFast.from_pretrained(str(fixture_dir))


@pytest.fixture(scope="module")
def backend(tokenizer):
    return XGrammarBackend(tokenizer, VOCAB, EOS)


def schema_spec(schema: dict) -> StructuredOutputSpec:
    return StructuredOutputSpec("json_schema", json.dumps(schema))


def accepts(backend, tokenizer, spec: StructuredOutputSpec, text: str, *, complete: bool = True) -> bool:
    """Whether the grammar accepts `text` token by token (and then eos, when `complete`)."""
    matcher = backend.new_matcher(backend.compile(spec))
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not all(matcher.accept_token(i) for i in ids):
        return False
    return not complete or (matcher.accept_token(EOS[0]) and matcher.is_terminated())


STRING_SCHEMAS = [
    {"type": "string"},
    {"type": "string", "maxLength": 8},
    {"type": "string", "minLength": 1},
    {"type": "string", "pattern": "^.+$"},
]


@pytest.mark.parametrize("schema", STRING_SCHEMAS, ids=lambda s: ",".join(sorted(s)))
def test_strings_never_contain_raw_control_characters(backend, tokenizer, schema):
    spec = schema_spec({"type": "object", "properties": {"s": schema}, "required": ["s"]})
    for raw in ["\x07", "\t", "\x1f", "\x00"]:
        assert not accepts(backend, tokenizer, spec, '{"s": "a' + raw + 'b"}'), repr(raw)
    assert accepts(backend, tokenizer, spec, '{"s": "ab"}')
    assert json.loads('{"s": "ab"}', strict=True) == {"s": "ab"}


def test_json_object_accepts_objects_only(backend, tokenizer):
    spec = StructuredOutputSpec("json_object")
    assert accepts(backend, tokenizer, spec, '{"a": [1, {"b": null}], "c": "x"}')
    assert accepts(backend, tokenizer, spec, "{}")
    assert not accepts(backend, tokenizer, spec, "[1]")
    assert not accepts(backend, tokenizer, spec, '"text"')


def test_eos_only_where_the_grammar_is_complete(backend, tokenizer):
    spec = StructuredOutputSpec("choice", json.dumps(["yes", "no"]))
    matcher = backend.new_matcher(backend.compile(spec))
    bitmask = backend.allocate_bitmask(1)
    allowed = lambda: set(torch.nonzero(_unpack(bitmask[0])).flatten().tolist())  # noqa: E731
    matcher.fill_bitmask(bitmask, 0)
    assert not allowed() & set(EOS)
    for token_id in tokenizer.encode("yes", add_special_tokens=False):
        assert matcher.accept_token(token_id)
    matcher.fill_bitmask(bitmask, 0)
    assert allowed() == set(EOS)
    assert not matcher.is_terminated() and matcher.accept_token(EOS[1]) and matcher.is_terminated()


def test_choice_literals_are_escaped(backend, tokenizer):
    odd = 'a "q" \\ \n é 🐱'
    spec = StructuredOutputSpec("choice", json.dumps(["plain", odd]))
    assert accepts(backend, tokenizer, spec, odd)
    assert not accepts(backend, tokenizer, spec, "pla")


def test_rollback_and_reset(backend, tokenizer):
    spec = StructuredOutputSpec("regex", "(cat|dog) [0-9]{2}")
    matcher = backend.new_matcher(backend.compile(spec))
    ids = tokenizer.encode("cat 42", add_special_tokens=False)
    assert all(matcher.accept_token(i) for i in ids)
    matcher.rollback(len(ids))
    assert all(matcher.accept_token(i) for i in tokenizer.encode("dog 17", add_special_tokens=False))
    assert matcher.accept_token(EOS[0]) and matcher.is_terminated()
    matcher.reset()
    assert not matcher.is_terminated()
    assert not matcher.accept_token(tokenizer.encode("x", add_special_tokens=False)[0])


@pytest.mark.parametrize(
    ("spec", "param", "words"),
    [
        (schema_spec({"type": "frobnicate"}), "response_format.json_schema.schema", "frobnicate"),
        (schema_spec({"$ref": "#/$defs/missing"}), "response_format.json_schema.schema", "missing"),
        (
            schema_spec({"type": "string", "pattern": "(("}),
            "response_format.json_schema.schema",
            "parenthesis",
        ),
        (StructuredOutputSpec("json_schema", "[1, 2]"), "response_format.json_schema.schema", "object"),
        (StructuredOutputSpec("regex", "[a-"), "guided_regex", "regex"),
        (StructuredOutputSpec("choice", "[]"), "guided_choice", "non-empty"),
    ],
)
def test_bad_specs_are_400s_naming_the_problem(backend, spec, param, words):
    with pytest.raises(GrammarError) as info:
        backend.compile(spec)
    assert isinstance(info.value, InvalidRequestError) and info.value.status_code == 400
    assert info.value.param == param
    assert words in info.value.message and ".cc:" not in info.value.message


def test_min_tokens_with_a_grammar_is_refused():
    params = SamplingParams(min_tokens=2, structured=StructuredOutputSpec("json_object"))
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        params.validate()


# ---- manager -----------------------------------------------------------------------------------


class CountingBackend:
    """Wraps the real backend; counts compiles and can hold them until released."""

    def __init__(self, inner: XGrammarBackend) -> None:
        self.inner = inner
        self.vocab_size = inner.vocab_size
        self.num_compiles = 0
        self.release = threading.Event()
        self.release.set()

    def compile(self, spec):
        self.num_compiles += 1
        assert self.release.wait(10)
        return self.inner.compile(spec)

    def grammar_num_bytes(self, compiled):
        return self.inner.grammar_num_bytes(compiled)

    def new_matcher(self, compiled):
        return self.inner.new_matcher(compiled)

    def allocate_bitmask(self, num_rows):
        return self.inner.allocate_bitmask(num_rows)


def regex_spec(i: int) -> StructuredOutputSpec:
    return StructuredOutputSpec("regex", f"item{i}")


def test_cache_is_lru_bounded_and_hits_skip_compiling(backend):
    counting = CountingBackend(backend)
    manager = StructuredOutputManager(lambda: counting, max_cached_grammars=2)

    async def main():
        for i in (0, 1, 0, 2, 0, 1):
            await manager.compile(regex_spec(i))

    asyncio.run(main())
    # 0, 1 compiled; 0 hit; 2 compiled (evicts 1: 0 was used more recently); 0 hit; 1 recompiled.
    assert counting.num_compiles == 4 and manager.num_cached == 2 and manager.num_cache_hits == 2
    assert manager.cached(regex_spec(2)) is None and manager.cached(regex_spec(1)) is not None
    manager.shutdown()


def test_equal_specs_in_flight_share_one_compile(backend):
    counting = CountingBackend(backend)
    counting.release.clear()
    manager = StructuredOutputManager(lambda: counting)

    async def main():
        waiters = [asyncio.ensure_future(manager.compile(regex_spec(7))) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiters)  # the loop stays free while compiling
        counting.release.set()
        return await asyncio.gather(*waiters)

    results = asyncio.run(main())
    assert counting.num_compiles == 1 and all(r is results[0] for r in results)
    manager.shutdown()


def test_compile_timeout_and_size_bounds_are_400s(backend):
    counting = CountingBackend(backend)
    counting.release.clear()
    manager = StructuredOutputManager(lambda: counting, compile_timeout_s=0.05, max_spec_chars=20)
    with pytest.raises(GrammarError, match="limit is 20"):
        manager.check_spec(StructuredOutputSpec("regex", "x" * 21))
    with pytest.raises(GrammarError, match="took longer than"):
        asyncio.run(manager.compile(regex_spec(1)))
    counting.release.set()
    small = StructuredOutputManager(lambda: backend, max_grammar_bytes=16)
    with pytest.raises(GrammarError, match="MiB"):
        asyncio.run(small.compile(regex_spec(1)))
    assert small.num_cached == 0
    manager.shutdown()
    small.shutdown()


# ---- bitmask -----------------------------------------------------------------------------------


def _unpack(row: torch.Tensor, vocab: int = VOCAB) -> torch.Tensor:
    """int32 [W] bitmask row -> bool [vocab] (bit j of word w = token 32 w + j)."""
    bits = (row.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1
    return bits.flatten().bool()[:vocab]


def test_bitmask_masks_constrained_rows_only(backend, tokenizer):
    """The runner's fill + the sampler's hook: one masked row, the others untouched bit for bit."""
    matcher = backend.new_matcher(backend.compile(StructuredOutputSpec("choice", json.dumps(["yes", "no"]))))
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    bitmask = GrammarBitmask(VOCAB)
    assert bitmask.fill([None, None, None], logits.device) is None and bitmask.num_filled_steps == 0
    filled = bitmask.fill([None, matcher, None], logits.device)
    assert filled is not None
    host, row_index = filled
    assert row_index.tolist() == [1] and host.shape == (3, (VOCAB + 31) // 32)
    apply_token_bitmask(logits, host, row_index)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = logits[1] > NEG_INF
    assert torch.equal(allowed, _unpack(host[1]))
    first_tokens = {tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", "no")}
    assert set(torch.nonzero(allowed).flatten().tolist()) >= first_tokens
    assert int(allowed.sum()) < VOCAB // 10


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "schema.uniqueItems"),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "schema.properties.a.not"),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "schema.maxLength"),
        ({"anyOf": [{"type": "integer"}, {"oneOf": [{"type": "integer"}]}]}, "schema.anyOf[1].oneOf"),
        ({"allOf": [{"type": "integer"}, {"minimum": 2}]}, "schema.allOf"),
        ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 1}}, "schema.contains"),
    ],
)
def test_keywords_the_grammar_would_ignore_are_400s(backend, schema, where):
    """xgrammar 0.2.8 accepts outputs violating these; we refuse the schema instead."""
    with pytest.raises(GrammarError, match=f"unsupported JSON schema at {re.escape(where)}"):
        backend.compile(schema_spec(schema))


def test_supported_keywords_compile(backend):
    schema = {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
        "type": "object",
        "properties": {
            "then": {"type": "string", "format": "date"},  # a property *named* like a keyword
            "p": {"$ref": "#/$defs/point"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
            "n": {"anyOf": [{"type": "integer", "multipleOf": 3}, {"type": "null"}]},
            "single": {"allOf": [{"type": "boolean"}]},
        },
        "required": ["then"],
    }
    assert backend.compile(schema_spec(schema)) is not None


def test_auto_tool_grammar_is_free_text_until_the_tag_opens(backend, tokenizer):
    from cogvlm_ray.api.structured import structured_request

    tool = {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        },
    }
    spec = structured_request(tools=[tool], tool_choice="auto").spec
    assert accepts(backend, tokenizer, spec, "Any text at all, even {broken json.")
    call = '<tool_call>{"name": "lookup", "arguments": {"q": "cats"}}</tool_call>'
    assert accepts(backend, tokenizer, spec, "Let me look. " + call)
    assert not accepts(backend, tokenizer, spec, 'Let me look. <tool_call>{"name": "other"', complete=False)
    assert not accepts(
        backend, tokenizer, spec, '<tool_call>{"name": "lookup", "arguments": {}}', complete=False
    )


@pytest.fixture(scope="module")
def bench_backend(tmp_path_factory):
    """The 4096-token tokenizer of the bench preset: it has the tokens ending inside a UTF-8
    character that trip xgrammar's long repeats."""
    directory = tmp_path_factory.mktemp("bench-tokenizer")
    write_tokenizer(directory, 4096)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory))
    return XGrammarBackend(tokenizer, 4096, (tokenizer.convert_tokens_to_ids("<|end_of_text|>"),))


def test_long_length_bounds_keep_mask_and_matcher_in_agreement(bench_backend):
    """xgrammar 0.2.8 length repeats above 128 allow tokens its matcher then rejects; the
    rewrite to a pattern keeps every masked-in token acceptable (random walks of 60 tokens)."""
    backend = bench_backend
    spec = schema_spec(
        {"type": "object", "properties": {"t": {"type": "string", "minLength": 1000}}, "required": ["t"]}
    )
    compiled = backend.compile(spec)
    bitmask = backend.allocate_bitmask(1)
    vocab = backend.vocab_size
    for seed in range(12):
        matcher, rng = backend.new_matcher(compiled), random.Random(seed)
        for _ in range(60):
            matcher.fill_bitmask(bitmask, 0)
            token_id = rng.choice(torch.nonzero(_unpack(bitmask[0], vocab)).flatten().tolist())
            assert matcher.accept_token(token_id) and not matcher.is_terminated(), (seed, token_id)


def test_unsupported_tool_parameters_are_400s_naming_tools(backend):
    from cogvlm_ray.api.structured import structured_request

    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}
    for choice in ("required", "auto"):
        with pytest.raises(GrammarError, match=r"arguments\.not") as info:
            backend.compile(structured_request(tools=[bad], tool_choice=choice).spec)
        assert info.value.param == "tools"
