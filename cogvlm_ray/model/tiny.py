"""Random CogVLM2 checkpoints in the official on-disk format, made offline.

`make_tiny_checkpoint(dir)` writes what `THUDM/cogvlm2-llama3-chat-19B` ships, at any size:
`config.json` (official keys), `generation_config.json`, weights under the official parameter
names and shapes (`rotary_emb.inv_freq` buffers included) as one
`model.safetensors` or HF-style shards + `model.safetensors.index.json`, and the Llama-3-shaped
tokenizer of `tiny_tokenizer.py`. Everything is deterministic in `seed`: the same arguments give
the same bytes.

Presets: "tiny" (the sizes of `tests/fixtures/cogvlm2-tiny`), "bench" (realistic proportions
sized for CPU), "full" (the real config; `tiny_config("full")` only, 39 GB is never written
without `allow_large=True`). This module owns the file format, not the model code.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import zlib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cogvlm_ray.config import ModelConfig, VisionConfig
from cogvlm_ray.model.tiny_tokenizer import NUM_SPECIAL_TOKENS, write_tokenizer

logger = logging.getLogger(__name__)

_MAX_BYTES_WITHOUT_CONSENT = 8 * 1024**3

PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # (top-level ModelConfig fields, VisionConfig fields)
    "tiny": (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_multi_query_heads=2, vocab_size=768),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_heads=4, image_size=56,
             patch_size=14),
    ),
    "bench": (
        dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=8, num_attention_heads=8,
             num_multi_query_heads=2, vocab_size=4096),
        dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_heads=4, image_size=224,
             patch_size=14),
    ),
    "full": ({}, {}),
}  # fmt: skip

_EMBEDDINGS = ("embed_tokens.weight", "position_embedding.weight")
_LEARNED_VECTORS = ("cls_embedding", ".boi", ".eoi")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_config(
    preset: str = "tiny", *, vision_overrides: dict[str, Any] | None = None, **overrides: Any
) -> ModelConfig:
    """The `ModelConfig` of a preset, patched by `overrides` (top-level fields) and `vision_overrides`.

    Special ids follow the Llama-3 layout in the last 256 ids unless given explicitly:
    bos = V-256, eos = (V-255, V-247), pad / image placeholder = V-254 (V = vocab_size).
    `vision num_positions` follows image_size / patch_size unless given.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    base_top, base_vision = PRESETS[preset]
    top = {**base_top, **overrides}
    known = {f.name for f in fields(ModelConfig)} - {"vision_config"}
    unknown = set(top) - known
    if unknown:
        raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
    vision_kwargs = {**base_vision, **(vision_overrides or {})}
    vision = replace(VisionConfig(), **vision_kwargs)
    if "num_positions" not in vision_kwargs:
        vision = replace(vision, num_positions=vision.grid_size**2 + 1)
    vocab_size = int(top.get("vocab_size", ModelConfig.vocab_size))
    if vocab_size < 2 * NUM_SPECIAL_TOKENS:
        raise ValueError(f"vocab_size must be >= {2 * NUM_SPECIAL_TOKENS} (256 bytes + 256 specials)")
    base = vocab_size - NUM_SPECIAL_TOKENS
    top.setdefault("bos_token_id", base)
    top.setdefault("eos_token_id", (base + 1, base + 9))
    top.setdefault("pad_token_id", base + 2)
    top["eos_token_id"] = tuple(top["eos_token_id"])
    config = replace(ModelConfig(), **top, vision_config=vision)
    config.validate()
    return config


def checkpoint_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Official parameter name -> shape, in module order (1221 tensors for the real config)."""
    d, inter, v = config.hidden_size, config.intermediate_size, config.vision_config
    qkv = d + 2 * config.num_multi_query_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, d)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes[p + "self_attn.rotary_emb.inv_freq"] = (config.head_dim // 2,)
        shapes[p + "self_attn.vision_expert_query_key_value.weight"] = (qkv, d)
        shapes[p + "self_attn.vision_expert_query_key_value.bias"] = (qkv,)
        shapes[p + "self_attn.vision_expert_dense.weight"] = (d, d)
        shapes[p + "self_attn.language_expert_query_key_value.weight"] = (qkv, d)
        shapes[p + "self_attn.language_expert_dense.weight"] = (d, d)
        for expert in ("language_mlp", "vision_mlp"):
            shapes[p + f"mlp.{expert}.gate_proj.weight"] = (inter, d)
            shapes[p + f"mlp.{expert}.up_proj.weight"] = (inter, d)
            shapes[p + f"mlp.{expert}.down_proj.weight"] = (d, inter)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    dv = v.hidden_size
    pe = "model.vision.patch_embedding."
    shapes[pe + "proj.weight"] = (dv, v.in_channels, v.patch_size, v.patch_size)
    shapes[pe + "proj.bias"] = (dv,)
    shapes[pe + "cls_embedding"] = (1, dv)
    shapes[pe + "position_embedding.weight"] = (v.num_positions, dv)
    for n in range(v.num_hidden_layers):
        p = f"model.vision.transformer.layers.{n}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[p + f"{norm}.weight"] = (dv,)
            shapes[p + f"{norm}.bias"] = (dv,)
        for name, shape in (
            ("attention.query_key_value", (3 * dv, dv)),
            ("attention.dense", (dv, dv)),
            ("mlp.fc1", (v.intermediate_size, dv)),
            ("mlp.fc2", (dv, v.intermediate_size)),
        ):
            shapes[p + name + ".weight"] = shape
            shapes[p + name + ".bias"] = (shape[0],)
    shapes["model.vision.conv.weight"] = (dv, dv, 2, 2)
    shapes["model.vision.conv.bias"] = (dv,)
    lp = "model.vision.linear_proj."
    shapes[lp + "linear_proj.weight"] = (d, dv)
    shapes[lp + "norm1.weight"] = (d,)
    shapes[lp + "norm1.bias"] = (d,)
    shapes[lp + "dense_h_to_4h.weight"] = (inter, d)
    shapes[lp + "gate_proj.weight"] = (inter, d)
    shapes[lp + "dense_4h_to_h.weight"] = (d, inter)
    shapes["model.vision.boi"] = (1, 1, d)
    shapes["model.vision.eoi"] = (1, 1, d)
    shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def rotary_inv_freq(config: ModelConfig, dtype: torch.dtype) -> torch.Tensor:
    """`1 / theta^(arange(0, head_dim, 2) / head_dim)` computed in float32, stored in `dtype` (official buffer)."""
    head_dim = config.head_dim
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    return (1.0 / (config.rope_theta**exponent)).to(dtype)


def init_tensor(
    name: str, shape: tuple[int, ...], config: ModelConfig, seed: int, dtype: torch.dtype
) -> torch.Tensor:
    """One random tensor, a pure function of (name, shape, seed): shard layout cannot change the values.

    Linear/conv weights ~ N(0, 1/fan_in) (about initializer_range at the real widths, and large enough
    that tiny models give non-degenerate logits), lm_head 6x that; cls/boi/eoi ~ N(0, 1/width);
    token and position embeddings ~ N(0, 1); norm weights 1 + N(0, 0.1^2); biases N(0, 0.1^2).
    """
    if name.endswith("rotary_emb.inv_freq"):
        return rotary_inv_freq(config, dtype)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if name.endswith(".bias"):
        out = noise.mul_(0.1)
    elif "norm" in name.rsplit(".", 2)[-2]:  # RMSNorm / LayerNorm weight
        out = noise.mul_(0.1).add_(1.0)
    elif name.endswith(_EMBEDDINGS):
        out = noise
    elif name.endswith(_LEARNED_VECTORS):
        out = noise.mul_(shape[-1] ** -0.5)
    elif name == "lm_head.weight":  # logits with std ~6 (as in the fixture): greedy margins >> float noise
        out = noise.mul_(6.0 * shape[1] ** -0.5)
    else:  # Linear [out, in] or Conv2d [out, in, kh, kw]
        out = noise.mul_(math.prod(shape[1:]) ** -0.5)
    return out.to(dtype)


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names into shards in order, as transformers' `save_pretrained` does.

    A new shard starts when adding the next tensor would exceed the limit; a tensor larger than the
    limit gets a shard of its own.
    """
    shards: list[list[str]] = [[]]
    current = 0
    for name, size in sizes.items():
        if shards[-1] and current + size > max_shard_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


def make_tiny_checkpoint(
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    shard_size_bytes: int | None = None,
    vision_overrides: dict[str, Any] | None = None,
    allow_large: bool = False,
    **overrides: Any,
) -> Path:
    """Write a random CogVLM2 checkpoint + tokenizer in the official layout to `out_dir`; return it.

    `shard_size_bytes` switches to `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`.
    Refuses to write more than 8 GiB of weights unless `allow_large` (the "full" preset is 39 GB).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    torch_dtype = _DTYPES[dtype]
    config = tiny_config(preset, vision_overrides=vision_overrides, torch_dtype=dtype, **overrides)
    shapes = checkpoint_shapes(config)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    sizes = {name: math.prod(shape) * itemsize for name, shape in shapes.items()}
    total = sum(sizes.values())
    if total > _MAX_BYTES_WITHOUT_CONSENT and not allow_large:
        raise ValueError(f"checkpoint would be {total / 1e9:.1f} GB; pass allow_large=True to write it")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config.to_dict())
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_id),
         "pad_token_id": config.pad_token_id},
    )  # fmt: skip

    def tensors(names: list[str]) -> dict[str, torch.Tensor]:
        return {n: init_tensor(n, shapes[n], config, seed, torch_dtype) for n in names}

    if shard_size_bytes is None:
        save_file(tensors(list(shapes)), str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards = plan_shards(sizes, shard_size_bytes)
        weight_map: dict[str, str] = {}
        for k, names in enumerate(shards, start=1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(tensors(names), str(out / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out / "model.safetensors.index.json", index)
    write_tokenizer(out, config.vocab_size)
    logger.info("wrote %s checkpoint (%d tensors, %d bytes) to %s", preset, len(shapes), total, out)
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def parse_size(text: str) -> int:
    """Bytes from "150MB", "1.5GiB" or a plain integer (decimal and binary units)."""
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    lowered = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * units[unit])
    return int(lowered)


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> None:
    """`cogvlm-ray-make-tiny OUT_DIR [--preset tiny|bench] [--seed N] [--dtype D] [--shard-size 500MB]`."""
    parser = argparse.ArgumentParser(
        description="Write a random CogVLM2 checkpoint + tokenizer (official format)."
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--shard-size", type=parse_size, default=None, help="e.g. 500MB; shards like HF")
    parser.add_argument(
        "--set",
        dest="overrides",
        type=_parse_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a top-level config field (repeatable)",
    )
    parser.add_argument(
        "--vision-set",
        dest="vision_overrides",
        type=_parse_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a vision_config field (repeatable)",
    )
    parser.add_argument("--allow-large", action="store_true", help="allow writing more than 8 GiB")
    args = parser.parse_args(argv)  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = make_tiny_checkpoint(
        args.out_dir,
        preset=args.preset,
        seed=args.seed,
        dtype=args.dtype,
        shard_size_bytes=args.shard_size,
        vision_overrides=dict(args.vision_overrides),
        allow_large=args.allow_large,
        **dict(args.overrides),
    )
    logger.info("done: %s", path)


if __name__ == "__main__":
    main()
