"""Frozen configuration dataclasses.

`ModelConfig` is read from a checkpoint's official `config.json` (class defaults applied
where the file omits a key, as the official `CogVLMConfig` does: e.g. `num_multi_query_heads`
= 8). It needs no torch and no weights, so the preprocessing replica uses it too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

#: The official template names (`build_conversation_input_ids(template_version=...)`).
TEMPLATE_VERSIONS = ("base", "chat", "vqa")


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1792
    intermediate_size: int = 15360
    num_hidden_layers: int = 63
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 1344
    in_channels: int = 3
    num_positions: int = 9217
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    dropout_prob: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side before the 2x2 downsample (96 for the real model)."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_multi_query_heads: int = 8
    vocab_size: int = 128256
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    hidden_act: str = "silu"
    template_version: str = "chat"
    bos_token_id: int = 128000
    eos_token_id: tuple[int, ...] = (128001, 128009)
    pad_token_id: int = 128002
    initializer_range: float = 0.02
    use_cache: bool = True
    torch_dtype: str | None = None
    rope_theta: float = 500000.0
    """Hard-coded in the official attention module, not a config key."""
    exact_rotary_positions: bool = False
    """False (default) reproduces the official rotary numerics: positions and angles in the
    dtype of inv_freq (bf16 when the model is bf16). True computes positions in float32."""
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    quantization_config: dict[str, Any] | None = None
    model_type: str | None = None
    architectures: tuple[str, ...] = ("CogVLMForCausalLM",)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_multi_query_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.eos_token_id

    @property
    def image_token_id(self) -> int:
        """The placeholder id written at image positions (the official code uses pad_token_id)."""
        return self.pad_token_id

    @property
    def num_image_tokens(self) -> int:
        """Positions an image occupies in the prompt: boi + (grid/2)^2 patches + eoi (2306 at 1344)."""
        return (self.vision_config.grid_size // 2) ** 2 + 2

    @property
    def max_context_len(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {k: v for k, v in raw.items() if k in known}
        eos = kwargs.get("eos_token_id", cls.eos_token_id)
        kwargs["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        if "architectures" in kwargs:
            kwargs["architectures"] = tuple(kwargs["architectures"] or ())
        vision = raw.get("vision_config") or {}
        vision_known = {f.name for f in fields(VisionConfig)}
        kwargs["vision_config"] = VisionConfig(**{k: v for k, v in vision.items() if k in vision_known})
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
        if not is_cogvlm2_config(raw):
            raise ValueError(
                f"{file} is not a CogVLM2 checkpoint config (architectures={raw.get('architectures')}, "
                f"model_type={raw.get('model_type')}); expected CogVLMForCausalLM with a vision_config"
            )
        return cls.from_dict(raw)

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_multi_query_heads:
            raise ValueError("num_attention_heads must be a multiple of num_multi_query_heads")
        v = self.vision_config
        if v.hidden_size % v.num_heads:
            raise ValueError("vision hidden_size must be divisible by num_heads")
        if v.grid_size % 2 or v.grid_size * v.patch_size != v.image_size:
            raise ValueError("vision image_size must be an even multiple of patch_size")
        if v.num_positions != v.grid_size**2 + 1:
            raise ValueError("vision num_positions must equal (image_size/patch_size)^2 + 1")
        if self.template_version not in TEMPLATE_VERSIONS:
            raise ValueError(f"template_version must be one of {TEMPLATE_VERSIONS}")

    def to_dict(self) -> dict[str, Any]:
        """The official config.json layout (for writing checkpoints)."""
        out: dict[str, Any] = {
            "architectures": list(self.architectures),
            "auto_map": {
                "AutoConfig": "configuration_cogvlm.CogVLMConfig",
                "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM",
            },
            "vision_config": {f.name: getattr(self.vision_config, f.name) for f in fields(VisionConfig)},
        }
        skip = {
            "vision_config",
            "architectures",
            "rope_theta",
            "exact_rotary_positions",
            "model_type",
            "quantization_config",
        }
        for f in fields(self):
            if f.name not in skip:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        if self.quantization_config is not None:
            out["quantization_config"] = self.quantization_config
        return out


def is_cogvlm2_config(raw: dict[str, Any]) -> bool:
    archs = raw.get("architectures") or []
    return "vision_config" in raw and (
        any("CogVLM" in a for a in archs) or raw.get("model_type") in ("cogvlm", "cogvlm2")
    )
