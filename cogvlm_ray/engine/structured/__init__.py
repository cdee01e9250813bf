"""Structured output: grammar-constrained decoding (JSON mode, JSON schema, regex, choice, tools).

    StructuredOutputSpec (contracts.py)
    -> CompiledGrammar     backend.py interface, xgrammar_backend.py implementation; compiled
                           once per distinct spec, off the engine loop (manager.py: thread pool
                           + LRU cache + compile time / size bounds)
    -> GrammarMatcher      one per request (Request.grammar); advanced on accepted tokens
    -> token bitmask       bitmask.py: int32 [B, ceil(V/32)] filled for the constrained rows of a
                           step and applied to the logits as one op on their device

Requests without a spec never touch any of this (no mask work when no row is constrained).
The OpenAI side (response_format, tools, guided_*) lives in `api/`; this package only sees specs.
"""
