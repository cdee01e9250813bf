"""Fixtures for the model tests: the official tiny checkpoint, its golden cases, a paged-cache driver."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogvlm_ray.hf import CogVLM2HFForCausalLM
from cogvlm_ray.model import AttentionMetadata, CogVLM2ForCausalLM, load_model
from cogvlm_ray.model.layout import build_position_ids, build_vision_expert_mask

FIXTURE_DIR = Path(__file__).parents[2] / "fixtures" / "cogvlm2-tiny"
CASES = ["chat_image", "base_image", "vqa_image", "chat_history_image", "text_only_chat"]


def assert_close_golden(ours: torch.Tensor, golden: torch.Tensor, what: str) -> None:
    """The fixture README's float32 tolerance: |ours - golden| <= 1e-4 + 1e-4 |golden|."""
    assert ours.shape == golden.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(golden.shape)}"
    excess = (ours.float() - golden).abs() - (1e-4 + 1e-4 * golden.abs())
    assert excess.max().item() <= 0, f"{what}: off by {(ours.float() - golden).abs().max().item():.3g}"


def load_case(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE_DIR / "cases" / f"{name}.safetensors"))


@pytest.fixture(scope="session")
def tiny_model() -> CogVLM2ForCausalLM:
    return load_model(FIXTURE_DIR, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_hf_model() -> CogVLM2HFForCausalLM:
    """The Hugging Face drop-in subclass (official forward / generate) over the same checkpoint."""
    return CogVLM2HFForCausalLM.from_pretrained(FIXTURE_DIR, torch_dtype=torch.float32)


@pytest.fixture(scope="session")
def cases_json() -> dict:
    return json.loads((FIXTURE_DIR / "cases.json").read_text())


@dataclass
class PagedRunner:
    """A minimal engine stand-in: allocates a paged cache and drives `forward_flat` per step."""

    model: CogVLM2ForCausalLM
    block_size: int = 4
    num_blocks: int = 256
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    tables: dict[str, list[int]] = field(default_factory=dict)
    lengths: dict[str, int] = field(default_factory=dict)
    free_blocks: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Blocks are handed out in a scrambled order so no test depends on contiguity; block 0
        # stays unused, so the zero padding of block tables is harmless.
        order = torch.randperm(self.num_blocks - 1, generator=torch.Generator().manual_seed(0)) + 1
        self.free_blocks = order.tolist()
        cfg = self.model.model_config
        shape = (self.num_blocks, self.block_size, cfg.num_multi_query_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, device=d, dtype=t), torch.zeros(shape, device=d, dtype=t))
            for d, t in self.model.kv_cache_layout()
        ]

    def _reserve(self, seq: str, extra: int) -> list[int]:
        table = self.tables.setdefault(seq, [])
        total = self.lengths.get(seq, 0) + extra
        while len(table) * self.block_size < total:
            table.append(self.free_blocks.pop())
        return table

    def step(self, chunks: list[tuple[str, dict[str, torch.Tensor]]]) -> list[torch.Tensor]:
        """Run one step; each chunk is (sequence name, dict of new input_ids/positions/vision_mask/
        optional image_embeds+image_token_mask). Returns each chunk's hidden states."""
        query_lens = [int(c["input_ids"].shape[0]) for _, c in chunks]
        context = [self.lengths.get(s, 0) for s, _ in chunks]
        tables = [self._reserve(s, q) for (s, _), q in zip(chunks, query_lens, strict=True)]
        meta = AttentionMetadata.build(query_lens, context, tables, self.block_size)
        cat = lambda key: torch.cat([c[key] for _, c in chunks])  # noqa: E731
        embeds = [c["image_embeds"] for _, c in chunks if c.get("image_embeds") is not None]
        image_mask = torch.cat(
            [c.get("image_token_mask", torch.zeros_like(c["input_ids"], dtype=torch.bool)) for _, c in chunks]
        )
        hidden = self.model.forward_flat(
            cat("input_ids"),
            cat("positions"),
            cat("vision_mask"),
            self.kv_caches,
            meta,
            image_embeds=torch.cat(embeds) if embeds else None,
            image_token_mask=image_mask if embeds else None,
        )
        for (s, _), q in zip(chunks, query_lens, strict=True):
            self.lengths[s] = self.lengths.get(s, 0) + q
        return list(hidden.split(query_lens))


def prompt_inputs(model: CogVLM2ForCausalLM, case: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flat forward inputs for a whole fixture prompt (positions and mask from our layout functions)."""
    types = case["token_type_ids"]
    out = {
        "input_ids": case["input_ids"],
        "positions": build_position_ids(types, case["attention_mask"]),
        "vision_mask": build_vision_expert_mask(types),
    }
    if "pixel_values" in case:
        out["image_embeds"] = model.encode_images(case["pixel_values"][None])[0]
        out["image_token_mask"] = types == 1
    return out


def decode_input(token_id: int, position: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([token_id]),
        "positions": torch.tensor([position]),
        "vision_mask": torch.tensor([False]),
    }


def greedy_decode(
    model: CogVLM2ForCausalLM, case: dict[str, torch.Tensor], max_new_tokens: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Our own cached greedy loop: prefill once, then one token per step; returns ids and step logits."""
    runner = PagedRunner(model)
    inputs = prompt_inputs(model, case)
    hidden = runner.step([("s", inputs)])[0]
    position = int(inputs["positions"][-1])
    ids, scores = [], []
    for _ in range(max_new_tokens):
        logits = model.compute_logits(hidden[-1:])[0]
        scores.append(logits)
        ids.append(int(logits.argmax()))
        position += 1
        hidden = runner.step([("s", decode_input(ids[-1], position))])[0]
    return ids, scores
