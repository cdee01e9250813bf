"""`NaiveLoop`: the official demo's way to generate, one request at a time, as a benchmark baseline.

No scheduler, no batching: the vision tower, one prefill, then one batch-1 `forward_flat` per
token over a private paged KV cache, greedy. Benchmarks (`bench/gpu_check.py`,
`bench/engine_bench.py`) compare the engine against it.
"""

from __future__ import annotations

import time

import torch

from cogvlm_ray.contracts import VISION_TOKEN_TYPE, PreparedPrompt
from cogvlm_ray.engine.kv_cache import allocate_kv_caches
from cogvlm_ray.model.attention import AttentionMetadata
from cogvlm_ray.model.cogvlm import CogVLM2ForCausalLM
from cogvlm_ray.model.layout import build_position_ids, build_vision_expert_mask
from cogvlm_ray.model.pixels import normalize_image


class NaiveLoop:
    """The official demo's approach: one request at a time, to completion, no engine.

    Vision tower, one prefill, then one batch-1 `forward_flat` per token over a private KV
    cache, greedy, fixed length (like ignore_eos). Each sampled id is read on the host, as
    the demo's streamer does, so times are device-synchronised.
    """

    def __init__(self, model: CogVLM2ForCausalLM, max_len: int, block_size: int = 16):
        config = model.model_config
        self.model, self.block_size = model, block_size
        num_blocks = -(-max_len // block_size)
        layout = model.kv_cache_layout()
        self.caches = allocate_kv_caches(
            layout, num_blocks, block_size, config.num_key_value_heads, config.head_dim
        )
        self.table = list(range(num_blocks))
        self.device = layout[0][0]

    @torch.inference_mode()
    def generate(self, prompt: PreparedPrompt, max_tokens: int) -> tuple[float, float, list[int]]:
        """(TTFT s, total s, token ids) for one request generating exactly `max_tokens` tokens."""
        model, device, table, block = self.model, self.device, self.table, self.block_size
        start = time.perf_counter()
        types = torch.tensor(prompt.token_type_ids)
        positions = build_position_ids(types)
        image_embeds = image_mask = None
        if prompt.image is not None:
            image_embeds = model.encode_images(normalize_image(prompt.image, device=device)[None])[0]
            image_mask = (types == VISION_TOKEN_TYPE).to(device)
        length = len(prompt.input_ids)
        hidden = model.forward_flat(
            torch.tensor(prompt.input_ids, device=device), positions.to(device),
            build_vision_expert_mask(types).to(device), self.caches,
            AttentionMetadata.build([length], [0], [table], block, device=device),
            image_embeds=image_embeds, image_token_mask=image_mask,
        )  # fmt: skip
        tokens = [int(model.compute_logits(hidden[-1:]).argmax(-1))]
        ttft = time.perf_counter() - start
        last_position = int(positions[-1])
        for step in range(1, max_tokens):
            hidden = model.forward_flat(
                torch.tensor([tokens[-1]], device=device), torch.tensor([last_position + step], device=device),
                torch.zeros(1, dtype=torch.bool, device=device), self.caches,
                AttentionMetadata.build([1], [length + step - 1], [table], block, device=device),
            )  # fmt: skip
            tokens.append(int(model.compute_logits(hidden).argmax(-1)))
        return ttft, time.perf_counter() - start, tokens
