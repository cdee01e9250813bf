"""Encoder budget (`EngineConfig.max_images_per_step`): at most that many vision-tower images per step.

Driven with hand-built runner outputs, like test_scheduler.py; one engine run checks that the
tower really runs on at most that many images per step and greedy outputs stay the goldens.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.contracts import SamplingParams
from cogvlm_ray.engine.config import EngineConfig
from cogvlm_ray.engine.kv_cache import BlockManager
from cogvlm_ray.engine.request import Request
from cogvlm_ray.engine.scheduler import Scheduler
from cogvlm_ray.model import load_model
from tests.unit.engine.conftest import make_request, make_scheduler, sample_all
from tests.unit.engine.fixture_prompts import CASES, load_case

NUM_IMAGE = 6  # image positions (boi, patches, eoi) in these prompts


def image_request(request_id: str, image_hash: str, num_text: int = 5, max_tokens: int = 4) -> Request:
    ids = [1] + [2] * NUM_IMAGE + [3 + i for i in range(num_text)]
    return Request(
        request_id=request_id,
        prompt_token_ids=ids,
        token_type_ids=[0] + [1] * NUM_IMAGE + [0] * num_text,
        sampling_params=SamplingParams(temperature=0.0, max_tokens=max_tokens),
        image=np.zeros((3, 4, 4), dtype=np.uint8),
        image_hash=image_hash,
    )


def tower_images(out) -> set[str]:
    """Images whose first position this step's chunks cover (what the tower must encode)."""
    return {
        item.request.image_hash
        for item in out.scheduled
        if item.request.image_span is not None
        and item.num_computed_tokens <= item.request.image_span[0] < item.end
    }


def test_image_span_is_known_for_image_prompts_only():
    assert image_request("a", "h").image_span == (1, 1 + NUM_IMAGE)
    assert make_request("t", 5).image_span is None


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_at_most_max_images_per_step_and_decodes_every_step(limit):
    scheduler = make_scheduler(num_blocks=256, max_num_seqs=16, max_images_per_step=limit)
    text = make_request("text", 4, max_tokens=30)
    scheduler.add_request(text)
    scheduler.update_from_output(out := scheduler.schedule(), sample_all(out))  # text is decoding now
    for i in range(7):
        scheduler.add_request(image_request(f"img{i}", f"hash{i}"))
    admitted_per_step = []
    for _ in range(12):
        out = scheduler.schedule()
        ids = {item.request_id for item in out.scheduled}
        assert "text" in ids  # the decode runs every step, whatever the image queue holds
        new = [item for item in out.scheduled if item.num_computed_tokens == 0]
        assert len(tower_images(out)) <= limit
        admitted_per_step.append(len(new))
        scheduler.update_from_output(out, sample_all(out))
    assert admitted_per_step[: 7 // limit] == [limit] * (7 // limit)  # the budget is used, not just bounded
    assert sum(admitted_per_step) == 7


def test_cached_images_and_twins_do_not_count():
    cached = {"hot"}
    scheduler = Scheduler(
        EngineConfig(block_size=4, num_kv_blocks=256, max_images_per_step=1),
        BlockManager(256, 4), (99,), 1024, is_image_cached=cached.__contains__,
    )  # fmt: skip
    for rid, image in [("a", "hot"), ("b", "cold"), ("c", "cold"), ("d", "hot"), ("e", "other")]:
        scheduler.add_request(image_request(rid, image))
    out = scheduler.schedule()
    # hot is cached (free), cold goes to the tower once for b and c, other waits for the next step
    assert [item.request_id for item in out.scheduled] == ["a", "b", "c", "d"]
    scheduler.update_from_output(out, sample_all(out))
    assert "e" in {item.request_id for item in scheduler.schedule().scheduled}


def test_a_chunk_inside_the_image_does_not_count_again():
    """Chunked prefill with a 5-token budget: a's first chunk covers the start of its image and
    takes the encoder budget; its next chunk, inside the image (the runner kept the features),
    does not, so b's image goes to the tower in that step."""
    scheduler = make_scheduler(num_blocks=256, max_num_batched_tokens=5, max_images_per_step=1)
    scheduler.add_request(image_request("a", "ha", num_text=0))  # 7 tokens: bos + 6 image positions
    scheduler.add_request(image_request("b", "hb", num_text=0))
    out = scheduler.schedule()
    assert [(i.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 5)]
    assert tower_images(out) == {"ha"}
    scheduler.update_from_output(out, sample_all(out))
    out = scheduler.schedule()
    assert [(i.request_id, i.num_computed_tokens, i.num_new_tokens) for i in out.scheduled] == [
        ("a", 5, 2),  # positions 5-6: the end of a's image
        ("b", 0, 3),
    ]
    assert tower_images(out) == {"hb"}


def test_engine_runs_the_tower_on_at_most_max_images_per_step(fixture_dir):
    model = load_model(fixture_dir, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(fixture_dir))
    cases = {name: load_case(fixture_dir, name) for name in CASES}
    tower_batches: list[int] = []
    encode = model.encode_images

    def counting(pixel_values):
        tower_batches.append(pixel_values.shape[0])
        return encode(pixel_values)

    model.encode_images = counting

    async def main():
        from cogvlm_ray.engine import Engine

        engine = Engine(
            model, tokenizer, EngineConfig(max_kv_tokens=2048, block_size=4, max_images_per_step=1)
        )
        params = SamplingParams(max_tokens=12, temperature=0.0)
        streams = [engine.add_request(cases[name][0], params, name) for name in CASES]
        results = await asyncio.gather(*(_collect(s) for s in streams))
        await engine.shutdown()
        return results

    results = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert tower_batches and max(tower_batches) == 1  # three distinct images, one per step
    assert sum(tower_batches) == 3
    for name, ids in zip(CASES, results, strict=True):
        assert ids == cases[name][1], name


async def _collect(stream) -> list[int]:
    return [t async for out in stream for t in out.new_token_ids]
