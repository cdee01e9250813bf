"""`CogVLM2HFForCausalLM`: the Hugging Face drop-in subclass of the core model (the official remote code's API).

`forward(input_ids=, token_type_ids=, attention_mask=, images=)` returns `.logits` `[B, L, V]`
float32, and `generate(...)` runs transformers' own `GenerationMixin` loop. Underneath, every
call goes through the engine path (`encode_images` / `forward_flat` / `compute_logits`) with a
small growable paged KV cache (`GenerationCache`), so there is one implementation of the model.

Padding: only tokens with `attention_mask == 1` are run. A padded column returns the logits of
the latest real token of its row, so right-padded batches generate exactly what each row would
generate alone (the official code does not; see the fixture README). Owns no weights; the
engine never uses this class (`load_model` builds the plain `CogVLM2ForCausalLM`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin, PreTrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.contracts import VISION_TOKEN_TYPE
from cogvlm_ray.hf.prompt import build_conversation_input_ids
from cogvlm_ray.model.attention import AttentionMetadata
from cogvlm_ray.model.cogvlm import CogVLM2ForCausalLM
from cogvlm_ray.model.layout import build_position_ids, build_vision_expert_mask
from cogvlm_ray.model.loading import load_model


class CogVLM2HFConfig(PreTrainedConfig):
    """transformers view of `ModelConfig`, for code (generation, accelerate) that expects one."""

    model_type = "cogvlm2"

    def __init__(self, vision_config: dict | None = None, **kwargs: Any):
        self.vision_config = vision_config or {}
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> CogVLM2HFConfig:
        raw = config.to_dict()
        raw.pop("auto_map", None)
        return cls(**raw)


#: transformers 5 names the returned cache `cache`; 4.x called it `past_key_values`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class GenerationCache:
    """Per-batch paged KV cache for the HF path; grows its block pool on demand.

    Also keeps every column's token type and mask seen so far (positions are recomputed from
    the full history, as the official code does) and each row's latest real hidden state.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, model: CogVLM2ForCausalLM, batch_size: int, block_size: int = 16):
        config = model.model_config
        self.block_size = block_size
        self.layout = model.kv_cache_layout()
        self.kv_shape = (block_size, config.num_multi_query_heads, config.head_dim)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = [
            (
                torch.zeros(0, *self.kv_shape, device=d, dtype=t),
                torch.zeros(0, *self.kv_shape, device=d, dtype=t),
            )
            for d, t in self.layout
        ]
        self.next_block = 0
        self.block_tables: list[list[int]] = [[] for _ in range(batch_size)]
        self.num_tokens = [0] * batch_size
        self.token_type_ids = torch.zeros(batch_size, 0, dtype=torch.long)
        self.attention_mask = torch.zeros(batch_size, 0, dtype=torch.long)
        self.last_hidden: torch.Tensor | None = None
        self.has_hidden = torch.zeros(batch_size, dtype=torch.bool)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.kv)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns seen so far (padding included), as transformers counts them."""
        return int(self.token_type_ids.shape[1])

    def allocate(self, query_lens: list[int]) -> list[list[int]]:
        """Reserve blocks so each row can hold `query_lens[b]` more tokens; returns the block tables."""
        for b, extra in enumerate(query_lens):
            needed = -(-(self.num_tokens[b] + extra) // self.block_size) - len(self.block_tables[b])
            for _ in range(max(needed, 0)):
                self.block_tables[b].append(self.next_block)
                self.next_block += 1
        capacity = self.kv[0][0].shape[0]
        if self.next_block > capacity:
            grow = max(self.next_block - capacity, capacity)
            self.kv = [
                tuple(torch.cat((c, c.new_zeros(grow, *self.kv_shape))) for c in pair)  # type: ignore[misc]
                for pair in self.kv
            ]
        return self.block_tables

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row i continues row `beam_idx[i]`. Copies KV blocks (beams may share a parent)."""
        order = beam_idx.tolist()
        source: list[int] = []
        tables: list[list[int]] = []
        for parent in order:
            tables.append(list(range(len(source), len(source) + len(self.block_tables[parent]))))
            source.extend(self.block_tables[parent])
        index = torch.tensor(source, dtype=torch.long)
        self.kv = [(k[index.to(k.device)], v[index.to(v.device)]) for k, v in self.kv]
        self.block_tables, self.next_block = tables, len(source)
        self.num_tokens = [self.num_tokens[p] for p in order]
        rows = beam_idx.cpu()
        self.token_type_ids, self.attention_mask = self.token_type_ids[rows], self.attention_mask[rows]
        self.has_hidden = self.has_hidden[rows]
        if self.last_hidden is not None:
            self.last_hidden = self.last_hidden[beam_idx.to(self.last_hidden.device)]

    def record(
        self, token_type_ids: torch.Tensor, attention_mask: torch.Tensor, query_lens: list[int]
    ) -> None:
        self.token_type_ids = torch.cat((self.token_type_ids, token_type_ids.cpu()), dim=1)
        self.attention_mask = torch.cat((self.attention_mask, attention_mask.cpu()), dim=1)
        self.num_tokens = [n + q for n, q in zip(self.num_tokens, query_lens, strict=True)]


class CogVLM2HFForCausalLM(GenerationMixin, CogVLM2ForCausalLM):
    """The official forward / generate / build_conversation_input_ids API on top of the engine path.

    `config` is a transformers config and `generation_config` the checkpoint's (or one built
    from `config.json`), as transformers' generation loop expects.
    """

    main_input_name = "input_ids"

    def __init__(self, config: ModelConfig, attention_backend: str = "sdpa"):
        super().__init__(config, attention_backend=attention_backend)
        self.config = CogVLM2HFConfig.from_model_config(config)
        self.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=list(config.eos_token_id),
            pad_token_id=config.pad_token_id,
            do_sample=False,
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str,
        *,
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: str | dict[str, Any] | None = None,
        max_memory: dict[int | str, int | str] | None = None,
        trust_remote_code: bool | None = None,
        **kwargs: Any,
    ) -> CogVLM2HFForCausalLM:
        """`AutoModelForCausalLM.from_pretrained`-style entry point: `load_model` building this class.

        `trust_remote_code` is accepted and ignored (nothing remote runs). The checkpoint's
        `generation_config.json`, when present, becomes `model.generation_config`.
        """
        model = load_model(
            path_or_hub_id,
            dtype=dtype or torch_dtype,
            device_map=device_map,
            max_memory=max_memory,
            model_cls=cls,
            **kwargs,
        )
        if (model.checkpoint_dir / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(model.checkpoint_dir)
        return model  # type: ignore[return-value]

    @classmethod
    def can_generate(cls) -> bool:
        return True

    @classmethod
    def is_remote_code(cls) -> bool:
        return False

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Our forward creates its own `GenerationCache` on the first call.
        return False

    @contextmanager
    def _optimize_model_for_decode(self) -> Iterator[None]:
        # transformers' hook switches MoE kernels of PreTrainedModel subclasses; nothing to do here.
        yield

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def build_conversation_input_ids(
        self,
        tokenizer: Any,
        *,
        query: str,
        history: list[tuple[str, str]] | None = None,
        images: list[Any] | None = None,
        template_version: str | None = None,
        answer: str | None = None,
    ) -> dict[str, Any]:
        """The official prompt builder (input_ids, token_type_ids, attention_mask, images)."""
        kwargs: dict[str, Any] = {}
        if answer is not None:
            kwargs["answer"] = answer
        return build_conversation_input_ids(
            tokenizer,
            query=query,
            history=history,
            images=images,
            template_version=template_version,
            config=self.model_config,
            **kwargs,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: list[list[torch.Tensor]] | None = None,
        cache: GenerationCache | None = None,
        past_key_values: GenerationCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Official-style forward on `[B, L]` tensors; `images` is one list of `[3, S, S]` per row."""
        if labels is not None:
            raise ValueError("training (labels=...) is not supported by cogvlm_ray")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got {tuple(input_ids.shape)}")
        batch_size, length = input_ids.shape
        cache = cache if cache is not None else past_key_values
        if cache is None:
            cache = GenerationCache(self, batch_size)
        past = cache.get_seq_length()
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, past + length, dtype=torch.long, device=input_ids.device)
        if token_type_ids.shape != input_ids.shape or attention_mask.shape != (batch_size, past + length):
            raise ValueError(
                f"token_type_ids {tuple(token_type_ids.shape)} must match input_ids {tuple(input_ids.shape)} and "
                f"attention_mask {tuple(attention_mask.shape)} must be [B, cached + L] = [{batch_size}, {past + length}]"
            )
        input_ids, token_type_ids, attention_mask = (
            t.cpu() for t in (input_ids, token_type_ids, attention_mask)
        )
        full_types = torch.cat((cache.token_type_ids, token_type_ids), dim=1)
        positions = build_position_ids(full_types, attention_mask)[:, -length:]
        new_mask = attention_mask[:, -length:]
        is_real = new_mask.bool()
        query_lens = is_real.sum(dim=1).tolist()
        flat_types = token_type_ids[is_real]
        image_token_mask = flat_types == VISION_TOKEN_TYPE
        image_embeds = (
            self._image_rows(images, token_type_ids, is_real) if bool(image_token_mask.any()) else None
        )

        meta = AttentionMetadata.build(
            query_lens, cache.num_tokens, cache.allocate(query_lens), cache.block_size, device=self.device
        )
        hidden = self.forward_flat(
            input_ids[is_real],
            positions[is_real],
            build_vision_expert_mask(token_type_ids)[is_real],
            cache.kv,
            meta,
            image_embeds=image_embeds,
            image_token_mask=image_token_mask if image_embeds is not None else None,
        )
        cache.record(token_type_ids, new_mask, query_lens)
        logits = self._padded_logits(hidden, is_real, cache, logits_to_keep)
        if use_cache is False:
            return CausalLMOutputWithPast(logits=logits)
        return CausalLMOutputWithPast(logits=logits, **{_CACHE_FIELD: cache})

    def _image_rows(
        self,
        images: list[list[torch.Tensor]] | None,
        token_type_ids: torch.Tensor,
        is_real: torch.Tensor,
    ) -> torch.Tensor:
        """Encode the images of every row that has image positions; rows `[N_img * tokens, H]` in order."""
        rows_with_images = ((token_type_ids == VISION_TOKEN_TYPE) & is_real).any(dim=1).tolist()
        if images is None or len(images) != len(rows_with_images):
            raise ValueError("token_type_ids mark image positions: pass images=[[img] for each row]")
        pixels = [img for b, has in enumerate(rows_with_images) if has for img in images[b]]
        if not pixels:
            raise ValueError("token_type_ids mark image positions but no image was given for those rows")
        embeds = self.encode_images(torch.stack([p.to(self.device) for p in pixels]))
        return embeds.reshape(-1, embeds.shape[-1])

    def _padded_logits(
        self,
        hidden: torch.Tensor,
        is_real: torch.Tensor,
        cache: GenerationCache,
        logits_to_keep: int,
    ) -> torch.Tensor:
        """`[B, K, V]` logits for the last K columns; a pad column repeats its row's latest real token.

        Rows of `table` = each row's latest hidden state from earlier calls (zeros if none), then this
        call's T real tokens; a column picks the newest table row at or before it.
        """
        batch_size, length = is_real.shape
        keep = length if not logits_to_keep else min(int(logits_to_keep), length)
        previous = (
            cache.last_hidden
            if cache.last_hidden is not None
            else hidden.new_zeros(batch_size, hidden.shape[-1])
        )
        table = torch.cat((previous, hidden))
        real_count = is_real.cumsum(dim=1)  # [B, L]
        row_start = torch.cat((torch.zeros(1, dtype=torch.long), real_count[:, -1].cumsum(0)[:-1]))
        index = torch.where(
            real_count > 0,
            batch_size + row_start[:, None] + real_count - 1,
            torch.arange(batch_size)[:, None],
        )
        known = cache.has_hidden[:, None] | (real_count > 0)  # [B, L]: some real token at or before
        cache.last_hidden = table[index[:, -1].to(table.device)]
        cache.has_hidden = known[:, -1]
        index, known = index[:, -keep:], known[:, -keep:]
        logits = self.compute_logits(table[index.reshape(-1).to(table.device)]).view(batch_size, keep, -1)
        return logits * known[..., None].to(logits.device)  # zeros before a row's first real token

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """transformers repeats tensors for beams / num_return_sequences; `images` is a list, repeat it too."""
        images = model_kwargs.pop("images", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size,
            is_encoder_decoder=is_encoder_decoder,
            input_ids=input_ids,
            **model_kwargs,
        )
        if images is not None:
            images = [row for row in images for _ in range(expand_size)]
        model_kwargs["images"] = images
        return input_ids, model_kwargs

    def _update_model_kwargs_for_generation(
        self, outputs: ModelOutput, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        """transformers repeats the last token type for new tokens; generated tokens are language (0)."""
        token_type_ids = model_kwargs.pop("token_type_ids", None)
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        mask = model_kwargs.get("attention_mask")
        if token_type_ids is not None:
            grown = (
                mask.shape[1] if mask is not None else token_type_ids.shape[1] + 1
            ) - token_type_ids.shape[1]
            model_kwargs["token_type_ids"] = torch.cat(
                (token_type_ids, token_type_ids.new_zeros(token_type_ids.shape[0], grown)), dim=1
            )
        return model_kwargs
