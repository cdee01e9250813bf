"""`CogVLM2ForCausalLM`: the native CogVLM2 model (vision tower + visual-expert Llama-3 decoder).

The engine-facing contract lives here: `encode_images`, `forward_flat` (a flat batch of new
tokens from many sequences over a paged KV cache) and `compute_logits`, plus
`kv_cache_layout`. No transformers: the Hugging Face drop-in surface (`forward(input_ids=...,
images=...)`, `generate`, `build_conversation_input_ids`) is the subclass
`cogvlm_ray.hf.CogVLM2HFForCausalLM`, built on the same three methods. Loading and sharding
live in `loading.py` / `sharding.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.model.attention import AttentionMetadata
from cogvlm_ray.model.language import CogVLMDecoderLayer, ExpertRouting, KVCache, RMSNorm
from cogvlm_ray.model.vision import EVA2CLIPModel, module_device

#: Units accelerate must keep on one device (`sharding.py`).
NO_SPLIT_MODULES = ["CogVLMDecoderLayer", "VisionTransformerLayer", "PatchEmbedding", "GLU"]


class CogVLMModel(nn.Module):
    """`model.*` in the checkpoint: token embeddings, vision path, decoder layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(CogVLMDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision = EVA2CLIPModel(config)


class CogVLM2ForCausalLM(nn.Module):
    """CogVLM2 (cogvlm2-llama3-chat-19B architecture) in plain torch; `model_config` is our `ModelConfig`."""

    _no_split_modules = NO_SPLIT_MODULES
    stop_token_ids: tuple[int, ...] = ()
    """The checkpoint's stop ids (config + generation_config.json), set by `load_model`."""

    def __init__(self, config: ModelConfig, attention_backend: str = "sdpa"):
        super().__init__()
        self.model_config = config
        self.model = CogVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.set_attention_backend(attention_backend)
        self.stop_token_ids = tuple(config.eos_token_ids)

    def set_attention_backend(self, name: str) -> None:
        """A name of `attention.ATTENTION_BACKENDS`: "sdpa" (default), "triton" or "reference"."""
        from cogvlm_ray.model.attention import ATTENTION_BACKENDS

        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(ATTENTION_BACKENDS)}")
        for layer in self.model.layers:
            layer.self_attn.attention_backend = name

    # ---- engine contract -------------------------------------------------------------------

    @property
    def embed_device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def model_dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def kv_cache_layout(self) -> list[tuple[torch.device, torch.dtype]]:
        """(device, dtype) of each decoder layer's KV cache: where that layer's weights live."""
        out = []
        for layer in self.model.layers:
            # The norm, not a projection: quantized projections store uint8 / int8 weights.
            weight = layer.input_layernorm.weight
            out.append((weight.device, weight.dtype))
        return out

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels `[N, 3, S, S]` -> `[N, num_image_tokens, hidden]` (boi, patches, eoi).

        Returned in the model dtype on the embedding device, ready for `forward_flat(image_embeds=...)`.
        """
        vision = self.model.vision
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [N, 3, S, S], got {tuple(pixel_values.shape)}")
        size = self.model_config.vision_config.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(f"images must be {size}x{size}, got {tuple(pixel_values.shape[-2:])}")
        pixel_values = pixel_values.to(device=module_device(vision.patch_embedding), dtype=self.model_dtype)
        return vision(pixel_values).to(device=self.embed_device, dtype=self.model_dtype)

    @torch.no_grad()
    def forward_flat(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        vision_expert_mask: torch.Tensor | None,
        kv_caches: list[KVCache],
        attn_metadata: AttentionMetadata,
        image_embeds: torch.Tensor | None = None,
        image_token_mask: torch.Tensor | None = None,
        *,
        expert_routing: ExpertRouting | None = None,
        image_token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the decoder on a flat batch of T new tokens; returns hidden states `[T, H]` after the final norm.

        Writes each token's K/V into `kv_caches` (one `(k, v)` per layer) at `attn_metadata.slot_mapping`
        and attends causally over each sequence's cached + new keys. `image_embeds` `[N_img, H]` are
        written, in order, at the flat rows `image_token_index` (int64, host-built) or where
        `image_token_mask` is True. Which rows use the vision expert comes from `expert_routing`
        (host-built) or `vision_expert_mask`; a language-only step does not touch the vision weights.

        With `expert_routing` (and `image_token_index` when there are image rows) the forward
        reads nothing back from the device: no host sync, which CUDA graphs require. The mask
        forms cost one sync each (`nonzero`).
        """
        if len(kv_caches) != len(self.model.layers):
            raise ValueError(f"expected {len(self.model.layers)} KV caches, got {len(kv_caches)}")
        h = self.model.embed_tokens(input_ids.to(self.embed_device))
        if image_embeds is not None:
            if image_token_index is None:
                if image_token_mask is None:
                    raise ValueError("image_embeds needs image_token_index or image_token_mask")
                image_token_index = image_token_mask.to(h.device).nonzero().squeeze(1)
            if image_token_index.shape[0] != image_embeds.shape[0]:
                raise ValueError(
                    f"{image_embeds.shape[0]} image rows for {image_token_index.shape[0]} image positions"
                )
            h = h.index_copy(
                0, image_token_index.to(h.device), image_embeds.to(device=h.device, dtype=h.dtype)
            )
        if expert_routing is None:
            if vision_expert_mask is None:
                raise ValueError("forward_flat needs expert_routing or vision_expert_mask")
            expert_routing = ExpertRouting.from_mask(vision_expert_mask)
        positions_on: dict[torch.device, torch.Tensor] = {}
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            device = module_device(layer)
            if device not in positions_on:
                positions_on[device] = positions.to(device)
            h = layer(
                h.to(device),
                positions_on[device],
                expert_routing.to(device),
                kv_cache,
                attn_metadata.to(device),
            )
        norm = self.model.norm
        return norm(h.to(norm.weight.device))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head on hidden states `[N, H]` -> float32 logits `[N, V]`."""
        with torch.no_grad():
            return self.lm_head(hidden.to(self.lm_head.weight.device)).float()
