"""Position ids and visual-expert routing: exact against the official outputs and hand-made layouts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cogvlm_ray.model.layout import build_position_ids, build_vision_expert_mask

from .conftest import CASES, FIXTURE_DIR, load_case


@pytest.mark.parametrize("name", CASES)
def test_fixture_cases_match_official_exactly(name: str) -> None:
    case = load_case(name)
    assert torch.equal(
        build_position_ids(case["token_type_ids"], case["attention_mask"]), case["position_ids"]
    )
    assert torch.equal(build_position_ids(case["token_type_ids"]), case["position_ids"])
    assert torch.equal(build_vision_expert_mask(case["token_type_ids"]).long(), case["vision_expert_mask"])


def test_right_padded_batch_matches_official() -> None:
    batch = load_file(str(FIXTURE_DIR / "batch.safetensors"))
    positions = build_position_ids(batch["token_type_ids"], batch["attention_mask"])
    assert positions.dtype == torch.int64
    assert torch.equal(positions, batch["position_ids"])


def test_one_image_costs_three_positions() -> None:
    # bos, boi, 4 patches, eoi, 2 text tokens
    types = torch.tensor([0, 1, 1, 1, 1, 1, 1, 0, 0])
    assert build_position_ids(types).tolist() == [0, 1, 2, 2, 2, 2, 3, 4, 5]
    # boi and patches -> vision expert; eoi and text -> language
    assert build_vision_expert_mask(types).tolist() == [
        False,
        True,
        True,
        True,
        True,
        True,
        False,
        False,
        False,
    ]


def test_last_position_is_always_language() -> None:
    types = torch.tensor([0, 1, 1, 1])
    assert build_vision_expert_mask(types).tolist() == [False, True, True, False]


def test_padding_repeats_previous_position_and_left_padding_starts_at_zero() -> None:
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    positions = build_position_ids(types, mask)
    assert positions[0].tolist() == [0, 0, 0, 1, 2, 3, 4]  # left pad: real row identical to unpadded
    assert positions[1].tolist() == [0, 1, 2, 3, 4, 4, 4]  # right pad repeats
    alone = build_position_ids(torch.tensor([0, 1, 1, 1, 0]))
    assert positions[0, 2:].tolist() == alone.tolist()


def test_batched_and_unbatched_shapes_agree() -> None:
    case = load_case("chat_image")
    one = build_position_ids(case["token_type_ids"])
    two = build_position_ids(case["token_type_ids"][None].repeat(2, 1))
    assert two.shape == (2, one.shape[0]) and torch.equal(two[1], one)
    assert torch.equal(
        build_vision_expert_mask(case["token_type_ids"][None])[0],
        build_vision_expert_mask(case["token_type_ids"]),
    )
