"""The paged flat forward: caching, mixed prefill/decode steps and batching change nothing."""

from __future__ import annotations

import pytest
import torch

from cogvlm_ray.model import AttentionMetadata, CogVLM2ForCausalLM

from .conftest import PagedRunner, decode_input, load_case, prompt_inputs

ATOL = 2e-5


def _slice(
    inputs: dict[str, torch.Tensor], start: int, end: int, image_rows_before: int
) -> dict[str, torch.Tensor]:
    """A chunk of a prompt, with the image rows its image positions need."""
    out = {k: inputs[k][start:end] for k in ("input_ids", "positions", "vision_mask")}
    if "image_embeds" in inputs:
        mask = inputs["image_token_mask"][start:end]
        n = int(mask.sum())
        if n:
            out["image_embeds"] = inputs["image_embeds"][image_rows_before : image_rows_before + n]
            out["image_token_mask"] = mask
    return out


def _full_recompute(
    model: CogVLM2ForCausalLM, case: dict[str, torch.Tensor], extra: list[int]
) -> torch.Tensor:
    """Hidden states of prompt + extra tokens computed in one prefill from an empty cache."""
    inputs = prompt_inputs(model, case)
    last = int(inputs["positions"][-1])
    full = {
        "input_ids": torch.cat([inputs["input_ids"], torch.tensor(extra)]),
        "positions": torch.cat([inputs["positions"], torch.arange(last + 1, last + 1 + len(extra))]),
        "vision_mask": torch.cat([inputs["vision_mask"], torch.zeros(len(extra), dtype=torch.bool)]),
    }
    if "image_embeds" in inputs:
        full["image_embeds"] = inputs["image_embeds"]
        full["image_token_mask"] = torch.cat(
            [inputs["image_token_mask"], torch.zeros(len(extra), dtype=torch.bool)]
        )
    return PagedRunner(model).step([("s", full)])[0]


@pytest.mark.parametrize("name", ["chat_image", "text_only_chat"])
def test_incremental_decode_equals_full_recompute(tiny_model: CogVLM2ForCausalLM, name: str) -> None:
    case = load_case(name)
    extra = [5, 77, 300, 12, 600, 9]
    runner = PagedRunner(tiny_model, block_size=4)
    inputs = prompt_inputs(tiny_model, case)
    # Prefill in two chunks (the split lands inside nothing special), then decode one token at a time.
    split = 13
    rows_before = int(inputs.get("image_token_mask", torch.zeros(0, dtype=torch.bool))[:split].sum())
    pieces = [runner.step([("s", _slice(inputs, 0, split, 0))])[0]]
    pieces.append(runner.step([("s", _slice(inputs, split, len(inputs["input_ids"]), rows_before))])[0])
    position = int(inputs["positions"][-1])
    for token in extra:
        position += 1
        pieces.append(runner.step([("s", decode_input(token, position))])[0])
    incremental = torch.cat(pieces)
    full = _full_recompute(tiny_model, case, extra)
    torch.testing.assert_close(incremental, full, atol=ATOL, rtol=1e-4)


def test_mixed_step_equals_running_each_alone(tiny_model: CogVLM2ForCausalLM) -> None:
    """One step with a prefill chunk of one sequence and decodes of two others."""
    a, b, c = (load_case(n) for n in ("chat_image", "text_only_chat", "base_image"))
    ins = {k: prompt_inputs(tiny_model, v) for k, v in (("a", a), ("b", b), ("c", c))}

    def next_decode(name: str, token: int) -> dict[str, torch.Tensor]:
        return decode_input(token, int(ins[name]["positions"][-1]) + 1)

    # Alone: each sequence in its own runner.
    alone: dict[str, torch.Tensor] = {}
    for name in ("b", "c"):
        r = PagedRunner(tiny_model)
        r.step([(name, ins[name])])
        alone[name] = r.step([(name, next_decode(name, 42))])[0]
    r = PagedRunner(tiny_model)
    r.step([("a", _slice(ins["a"], 0, 4, 0))])
    alone["a"] = r.step([("a", _slice(ins["a"], 4, len(ins["a"]["input_ids"]), 3))])[0]

    # Together: b and c prefilled, a's first chunk run; then one mixed step.
    together = PagedRunner(tiny_model)
    together.step([("b", ins["b"]), ("c", ins["c"]), ("a", _slice(ins["a"], 0, 4, 0))])
    out = together.step(
        [
            ("b", next_decode("b", 42)),
            ("a", _slice(ins["a"], 4, len(ins["a"]["input_ids"]), 3)),
            ("c", next_decode("c", 42)),
        ]
    )
    torch.testing.assert_close(out[0], alone["b"], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out[1], alone["a"], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out[2], alone["c"], atol=ATOL, rtol=1e-4)


def test_batched_prefill_of_different_lengths_equals_each_alone(tiny_model: CogVLM2ForCausalLM) -> None:
    names = ["chat_history_image", "text_only_chat", "base_image", "vqa_image"]
    ins = [prompt_inputs(tiny_model, load_case(n)) for n in names]
    together = PagedRunner(tiny_model).step(list(zip(names, ins, strict=True)))
    for name, inputs, got in zip(names, ins, together, strict=True):
        alone = PagedRunner(tiny_model).step([(name, inputs)])[0]
        torch.testing.assert_close(got, alone, atol=ATOL, rtol=1e-4)


def test_reference_attention_equals_sdpa(tiny_model: CogVLM2ForCausalLM) -> None:
    names = ["chat_image", "text_only_chat"]
    ins = [prompt_inputs(tiny_model, load_case(n)) for n in names]
    results = {}
    try:
        for backend in ("reference", "sdpa"):
            tiny_model.set_attention_backend(backend)
            runner = PagedRunner(tiny_model)
            first = runner.step(list(zip(names, ins, strict=True)))
            second = runner.step(
                [(n, decode_input(7, int(i["positions"][-1]) + 1)) for n, i in zip(names, ins, strict=True)]
            )
            results[backend] = torch.cat(first + second)
    finally:
        tiny_model.set_attention_backend("sdpa")
    torch.testing.assert_close(results["reference"], results["sdpa"], atol=ATOL, rtol=1e-4)


def test_decode_step_does_not_run_vision_expert(tiny_model: CogVLM2ForCausalLM) -> None:
    calls: list[str] = []
    hooks = []
    for i, layer in enumerate(tiny_model.model.layers):
        for name, module in (
            ("qkv", layer.self_attn.vision_expert_query_key_value),
            ("dense", layer.self_attn.vision_expert_dense),
            ("mlp", layer.mlp.vision_mlp),
        ):
            hooks.append(module.register_forward_hook(lambda *_a, tag=f"{i}.{name}": calls.append(tag)))
    try:
        runner = PagedRunner(tiny_model)
        inputs = prompt_inputs(tiny_model, load_case("chat_image"))
        runner.step([("s", inputs)])
        assert len(calls) == 3 * len(tiny_model.model.layers)  # prefill with an image uses the experts
        calls.clear()
        runner.step([("s", decode_input(3, int(inputs["positions"][-1]) + 1))])
        assert calls == []
    finally:
        for hook in hooks:
            hook.remove()


def test_metadata_slots_follow_block_tables() -> None:
    meta = AttentionMetadata.build(
        query_lens=[3, 1], context_lens=[0, 5], block_tables=[[7], [2, 9]], block_size=4
    )
    assert meta.query_start_loc.tolist() == [0, 3, 4]
    assert meta.seq_lens.tolist() == [3, 6]
    assert meta.slot_mapping.tolist() == [28, 29, 30, 9 * 4 + 1]
    assert meta.block_tables.tolist() == [[7, 0], [2, 9]]
    assert (meta.max_query_len, meta.max_seq_len) == (3, 6)
    with pytest.raises(ValueError):
        AttentionMetadata.build(query_lens=[5], context_lens=[0], block_tables=[[1]], block_size=4)
