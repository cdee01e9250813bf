"""Structured output through the engine on the random tiny CogVLM2 (CPU), sampling at temperature 1.

The weights are random, so whatever validity the outputs have comes from the grammar: every
bounded schema below must give, for each of 24 seeds, text that `json.loads(strict=True)` parses
and `jsonschema` validates. Also: max_tokens inside JSON, stop strings and aborts under a grammar,
compile errors as 400s, compiles that do not stall other streams, and unconstrained requests that
are bit-identical to the same requests run without any constrained company.
"""

from __future__ import annotations

import asyncio
import json
import threading

import jsonschema
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.contracts import SamplingParams, StructuredOutputSpec
from cogvlm_ray.engine import Engine, EngineConfig
from cogvlm_ray.errors import GrammarError
from cogvlm_ray.model import load_model
from tests.unit.engine.fixture_prompts import text_prompt

NUM_SEEDS = 24

SCHEMAS = {
    "nested_objects": {
        "type": "object",
        "properties": {
            "item": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "maxLength": 6},
                    "box": {
                        "type": "object",
                        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99}},
                        "required": ["x"],
                    },
                },
                "required": ["label", "box"],
            }
        },
        "required": ["item"],
    },
    "array_min_max_items": {
        "type": "object",
        "properties": {
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": -5, "maximum": 5},
                "minItems": 2,
                "maxItems": 4,
            }
        },
        "required": ["scores"],
    },
    "enums": {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L"]},
            "flag": {"type": "boolean"},
        },
        "required": ["colour", "size", "flag"],
    },
    "required_and_optional": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 9},
            "note": {"type": "string", "maxLength": 4},
            "ok": {"type": "boolean"},
        },
        "required": ["id"],
        "additionalProperties": False,
    },
    "integer_bounds": {
        "type": "object",
        "properties": {
            "year": {"type": "integer", "minimum": 1990, "maximum": 2030},
            "count": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
        },
        "required": ["year", "count"],
    },
    "string_patterns": {
        "type": "object",
        "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "code": {"type": "string", "pattern": "^(ab|cd){1,3}$"},
            "short": {"type": "string", "minLength": 1, "maxLength": 3},
        },
        "required": ["sku", "code", "short"],
    },
}


@pytest.fixture(scope="module")
def model(fixture_dir):
    return load_model(fixture_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(fixture_dir):
    return PreTrainedTokenizerFast.from_pretrained(str(fixture_dir))


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return text_prompt(
        [512, *tokenizer.encode("Read the receipt. Answer in JSON:", add_special_tokens=False)]
    )


def make_engine(model, tokenizer, **config) -> Engine:
    return Engine(model, tokenizer, EngineConfig(**{"max_kv_tokens": 8192, "block_size": 4, **config}))


def schema_spec(schema: dict) -> StructuredOutputSpec:
    return StructuredOutputSpec("json_schema", json.dumps(schema))


def sampled(spec: StructuredOutputSpec | None, seed: int, **params) -> SamplingParams:
    return SamplingParams(
        **{"max_tokens": 96, "temperature": 1.0, "seed": seed, "structured": spec, **params}
    )


async def collect(stream) -> tuple[str, list]:
    outputs = [out async for out in stream]
    return "".join(out.new_text for out in outputs), outputs


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=180))


def generate(
    engine: Engine, prompt, params: list[SamplingParams], prefix: str = "r"
) -> list[tuple[str, list]]:
    async def main():
        streams = [engine.add_request(prompt, p, f"{prefix}{i}") for i, p in enumerate(params)]
        return await asyncio.gather(*(collect(s) for s in streams))

    return run(main())


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_seeded_output_parses_strictly_and_validates(model, tokenizer, prompt, name):
    schema = SCHEMAS[name]
    engine = make_engine(model, tokenizer)
    results = generate(engine, prompt, [sampled(schema_spec(schema), seed) for seed in range(NUM_SEEDS)])
    for seed, (text, outputs) in enumerate(results):
        assert outputs[-1].finish_reason == "stop", (seed, text)
        value = json.loads(text, strict=True)
        jsonschema.validate(value, schema)
    assert engine.structured.num_compiled == 1  # one schema, one compile, shared by 24 requests


def test_json_object_outputs_are_objects(model, tokenizer, prompt):
    engine = make_engine(model, tokenizer)
    max_tokens = 40
    spec = StructuredOutputSpec("json_object")
    results = generate(
        engine, prompt, [sampled(spec, seed, max_tokens=max_tokens) for seed in range(NUM_SEEDS)]
    )
    for text, outputs in results:
        assert text.startswith("{") and not any(ord(c) < 0x20 for c in text), text
        if outputs[-1].finish_reason == "stop":
            assert isinstance(json.loads(text, strict=True), dict)
        else:  # random weights rarely close a string; what was generated is still returned
            assert outputs[-1].finish_reason == "length"
            assert outputs[-1].num_generated_tokens == max_tokens
    assert len({text for text, _ in results}) > NUM_SEEDS // 2  # really sampled, seed by seed


def test_max_tokens_inside_json_is_length_with_the_partial_text(model, tokenizer, prompt):
    engine = make_engine(model, tokenizer)
    spec = schema_spec(SCHEMAS["nested_objects"])
    [(text, outputs)] = generate(engine, prompt, [sampled(spec, 0, max_tokens=4)])
    assert outputs[-1].finish_reason == "length" and outputs[-1].num_generated_tokens == 4
    assert text.startswith('{"it') and text == tokenizer.decode(
        [t for o in outputs for t in o.new_token_ids], skip_special_tokens=True
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_regex_choice_and_termination_under_ignore_eos(model, tokenizer, prompt):
    engine = make_engine(model, tokenizer)
    regex = StructuredOutputSpec("regex", "[a-z]{3,6}@example\\.com")
    choice = StructuredOutputSpec("choice", json.dumps(["receipt", "invoice", "other"]))
    params = [sampled(regex, s) for s in range(4)] + [sampled(choice, s, ignore_eos=True) for s in range(4)]
    results = generate(engine, prompt, params)
    for text, outputs in results[:4]:
        assert outputs[-1].finish_reason == "stop"
        assert text.endswith("@example.com") and 3 <= len(text.split("@")[0]) <= 6
    for text, outputs in results[4:]:
        # ignore_eos: the scheduler would not stop on eos, the terminated grammar does.
        assert text in {"receipt", "invoice", "other"} and outputs[-1].finish_reason == "stop"
        assert outputs[-1].new_token_ids[-1] in engine.eos_token_ids  # ended on the eos it allowed


def test_mixed_batch_leaves_unconstrained_outputs_unchanged(model, tokenizer, prompt):
    plain = [SamplingParams(max_tokens=16, temperature=0.0), sampled(None, 5, max_tokens=16)]
    alone = generate(make_engine(model, tokenizer), prompt, plain, prefix="alone")
    engine = make_engine(model, tokenizer)
    constrained = [sampled(schema_spec(SCHEMAS["enums"]), s) for s in range(3)]
    mixed = generate(engine, prompt, [constrained[0], plain[0], constrained[1], plain[1], constrained[2]])
    assert mixed[1][0] == alone[0][0] and mixed[3][0] == alone[1][0]
    ids = lambda result: [t for o in result[1] for t in o.new_token_ids]  # noqa: E731
    assert ids(mixed[1]) == ids(alone[0]) and ids(mixed[3]) == ids(alone[1])
    for text, _ in (mixed[0], mixed[2], mixed[4]):
        jsonschema.validate(json.loads(text, strict=True), SCHEMAS["enums"])
    assert engine.runner.grammar_bitmask.num_filled_steps > 0


def test_unconstrained_requests_never_touch_the_grammar_layer(model, tokenizer, prompt):
    engine = make_engine(model, tokenizer)
    generate(engine, prompt, [sampled(None, s, max_tokens=8) for s in range(3)])
    assert engine.runner.grammar_bitmask.num_filled_steps == 0
    assert engine.structured._backend is None  # xgrammar was never even set up


def test_stop_string_cuts_constrained_output(model, tokenizer, prompt):
    engine = make_engine(model, tokenizer)
    spec = StructuredOutputSpec("regex", 'total: "12 EUR" paid')
    [(text, outputs)] = generate(engine, prompt, [sampled(spec, 0, stop=("EUR",))])
    assert text == 'total: "12 ' and outputs[-1].finish_reason == "stop"
    assert not engine.scheduler.has_unfinished_requests()


def test_abort_under_constraint_frees_the_request(model, tokenizer, prompt):
    async def main():
        engine = make_engine(model, tokenizer)
        stream = engine.add_request(
            prompt, sampled(StructuredOutputSpec("json_object"), 0, max_tokens=500), "a"
        )
        first = await anext(stream)
        engine.abort("a")
        rest = [o async for o in stream]
        after = await collect(engine.add_request(prompt, sampled(schema_spec(SCHEMAS["enums"]), 1), "b"))
        await engine.shutdown()
        return engine, first, rest, after

    engine, first, rest, (text, _) = run(main())
    assert first.finish_reason is None and rest[-1].finish_reason == "abort"
    assert engine.block_manager.usage == 0.0
    jsonschema.validate(json.loads(text, strict=True), SCHEMAS["enums"])


class GatedBackend:
    """The real backend, with compiles held until `gate` is set."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.vocab_size = inner.vocab_size
        self.gate = threading.Event()

    def compile(self, spec):
        assert self.gate.wait(30)
        return self.inner.compile(spec)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def gate_compiles(engine: Engine) -> GatedBackend:
    gated = GatedBackend(engine.structured.backend)
    engine.structured._backend = gated
    return gated


def test_compiling_does_not_stall_other_streams_and_abort_while_compiling(model, tokenizer, prompt):
    async def main():
        engine = make_engine(model, tokenizer)
        gated = gate_compiles(engine)
        waiting = engine.add_request(prompt, sampled(schema_spec(SCHEMAS["enums"]), 0), "constrained")
        dropped = engine.add_request(prompt, sampled(schema_spec(SCHEMAS["integer_bounds"]), 0), "dropped")
        pending = asyncio.ensure_future(collect(waiting))
        plain_text, plain = await collect(
            engine.add_request(prompt, sampled(None, 1, max_tokens=12), "plain")
        )
        assert not pending.done()  # the plain request finished while the grammar was compiling
        engine.abort("dropped")
        dropped_outputs = [o async for o in dropped]
        gated.gate.set()
        text, _ = await pending
        await engine.shutdown()
        return plain, dropped_outputs, text, engine

    plain, dropped_outputs, text, engine = run(main())
    assert plain[-1].finish_reason == "length" and plain[-1].num_generated_tokens == 12
    assert [o.finish_reason for o in dropped_outputs] == ["abort"]
    jsonschema.validate(json.loads(text, strict=True), SCHEMAS["enums"])
    assert not engine._compiling and not engine.scheduler.requests


@pytest.mark.parametrize(
    "spec",
    [
        schema_spec({"type": "object", "properties": {"a": {"type": "nope"}}}),
        StructuredOutputSpec("regex", "(unclosed"),
    ],
    ids=["schema", "regex"],
)
def test_bad_grammar_fails_the_stream_with_a_400_and_the_engine_goes_on(model, tokenizer, prompt, spec):
    async def main():
        engine = make_engine(model, tokenizer)
        stream = engine.add_request(prompt, sampled(spec, 0), "bad")
        with pytest.raises(GrammarError) as info:
            await anext(stream)
        good = await collect(engine.add_request(prompt, sampled(None, 0, max_tokens=4), "good"))
        await engine.shutdown()
        return info.value, good

    error, (_, outputs) = run(main())
    assert error.status_code == 400 and error.code == "invalid_grammar"
    assert outputs[-1].finish_reason == "length"


def test_compile_timeout_is_a_400(model, tokenizer, prompt):
    async def main():
        engine = make_engine(model, tokenizer, grammar_compile_timeout_s=0.05)
        gated = gate_compiles(engine)
        with pytest.raises(GrammarError, match="took longer"):
            await collect(engine.add_request(prompt, sampled(schema_spec(SCHEMAS["enums"]), 0), "slow"))
        gated.gate.set()
        await engine.shutdown()

    run(main())


def test_each_choice_of_an_n_request_follows_its_own_matcher(model, tokenizer, prompt):
    engine = make_engine(model, tokenizer)
    gate = gate_compiles(engine)  # the choices wait for the grammar together, then all run
    gate.gate.set()
    params = sampled(schema_spec(SCHEMAS["string_patterns"]), 11, n=3)

    async def main():
        outputs = [o async for o in engine.add_request(prompt, params, "group")]
        await engine.shutdown()
        return outputs

    outputs = run(main())
    texts = {i: "".join(o.new_text for o in outputs if o.index == i) for i in range(3)}
    reasons = {o.index: o.finish_reason for o in outputs if o.finish_reason}
    assert reasons == {0: "stop", 1: "stop", 2: "stop"}
    for text in texts.values():
        jsonschema.validate(json.loads(text, strict=True), SCHEMAS["string_patterns"])
    assert not engine._compiling and not engine.scheduler.requests
