"""The random-checkpoint factory writes the official CogVLM2 format (names, shapes, files, tokenizer)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.model.tiny import checkpoint_shapes, main, make_tiny_checkpoint, tiny_config
from cogvlm_ray.model.tiny_tokenizer import llama3_special_tokens, train_bpe

MIXED_TEXT = "What is in this picture? 你好，世界。猫 🐱🚀 café naïve — “quoted” 1,344 px\n next line"


def _shapes_in(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=3)


def test_full_preset_is_the_published_config_and_spec_table(fixture_dir: Path) -> None:
    config = tiny_config("full")
    assert config == ModelConfig.from_pretrained(fixture_dir / "real_config.json")
    shapes = checkpoint_shapes(config)
    # The official checkpoint: 1221 tensors, index total_size 39,006,214,656 bytes in bf16.
    assert len(shapes) == 1221
    assert 2 * sum(math.prod(s) for s in shapes.values()) == 39_006_214_656
    expected = {
        "model.embed_tokens.weight": (128256, 4096),
        "model.layers.31.self_attn.language_expert_query_key_value.weight": (6144, 4096),
        "model.layers.0.self_attn.vision_expert_query_key_value.bias": (6144,),
        "model.layers.5.self_attn.rotary_emb.inv_freq": (64,),
        "model.layers.7.mlp.vision_mlp.down_proj.weight": (4096, 14336),
        "model.vision.patch_embedding.proj.weight": (1792, 3, 14, 14),
        "model.vision.patch_embedding.position_embedding.weight": (9217, 1792),
        "model.vision.transformer.layers.62.mlp.fc1.weight": (15360, 1792),
        "model.vision.conv.weight": (1792, 1792, 2, 2),
        "model.vision.linear_proj.dense_4h_to_h.weight": (4096, 14336),
        "model.vision.boi": (1, 1, 4096),
        "lm_head.weight": (128256, 4096),
    }
    assert {k: shapes[k] for k in expected} == expected
    assert "model.layers.32.input_layernorm.weight" not in shapes
    assert "model.vision.transformer.layers.63.mlp.fc1.weight" not in shapes


def test_tiny_checkpoint_matches_fixture_names_shapes_and_config(tiny_dir: Path, fixture_dir: Path) -> None:
    assert _shapes_in(tiny_dir / "model.safetensors") == _shapes_in(fixture_dir / "model.safetensors")
    ours = ModelConfig.from_pretrained(tiny_dir)
    official = ModelConfig.from_pretrained(fixture_dir)
    assert ours == official
    raw = json.loads((tiny_dir / "config.json").read_text())
    assert set(json.loads((fixture_dir / "config.json").read_text())) <= set(raw)
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 512, "eos_token_id": [513, 521], "pad_token_id": 514}


def test_weights_have_sane_scale_and_official_inv_freq(tiny_dir: Path, fixture_dir: Path) -> None:
    weights = load_file(str(tiny_dir / "model.safetensors"))
    golden = load_file(str(fixture_dir / "model.safetensors"))
    inv_freq = "model.layers.1.self_attn.rotary_emb.inv_freq"
    assert torch.equal(weights[inv_freq], golden[inv_freq])
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    for name, tensor in weights.items():
        if tensor.numel() >= 64 and not name.endswith("inv_freq"):
            # Same order of magnitude as the official fixture's random init (no zeros, no blow-ups).
            ratio = tensor.std() / golden[name].std()
            assert 0.3 < ratio < 3, (name, float(ratio))


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = make_tiny_checkpoint(tmp_path / "a", seed=7)
    b = make_tiny_checkpoint(tmp_path / "b", seed=7)
    c = make_tiny_checkpoint(tmp_path / "c", seed=8)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_sharded_layout_like_hf(tmp_path: Path) -> None:
    single = make_tiny_checkpoint(tmp_path / "single", seed=1, dtype="bfloat16")
    limit = 200_000
    sharded = make_tiny_checkpoint(tmp_path / "sharded", seed=1, dtype="bfloat16", shard_size_bytes=limit)
    assert not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert len(files) > 2
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    assert sorted(p.name for p in sharded.glob("model-*.safetensors")) == files
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    reference = load_file(str(single / "model.safetensors"))
    assert set(index["weight_map"]) == set(reference)
    total = 0
    for file in files:
        shard = load_file(str(sharded / file))
        shard_bytes = sum(t.numel() * t.element_size() for t in shard.values())
        assert shard_bytes <= limit or len(shard) == 1
        for name, tensor in shard.items():
            assert index["weight_map"][name] == file
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, reference[name]), name
        total += shard_bytes
    assert index["metadata"]["total_size"] == total
    inv_freq = reference["model.layers.0.self_attn.rotary_emb.inv_freq"]
    expected = 1.0 / 500000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    assert inv_freq.dtype == torch.bfloat16 and torch.equal(inv_freq, expected.to(torch.bfloat16))


def test_tokenizer_round_trips_and_matches_config(tiny_dir: Path, fixture_dir: Path) -> None:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_dir)
    config = ModelConfig.from_pretrained(tiny_dir)
    assert len(tokenizer) == config.vocab_size
    ids = tokenizer(MIXED_TEXT).input_ids
    assert ids[0] == config.bos_token_id
    assert tokenizer(MIXED_TEXT, add_special_tokens=False).input_ids == ids[1:]
    assert max(ids[1:]) < config.vocab_size - 256  # no special token inside plain text
    assert tokenizer.decode(ids[1:]) == MIXED_TEXT
    assert len(ids) < len(MIXED_TEXT.encode())  # merges are learned, not bytes only
    assert tokenizer.bos_token_id == config.bos_token_id
    assert tokenizer.eos_token_id == config.eos_token_id[0]
    assert tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|reserved_special_token_0|>"]) == [
        config.eos_token_id[1],
        config.pad_token_id,
    ]
    official = json.loads((fixture_dir / "tokenizer.json").read_text())
    ours = json.loads((tiny_dir / "tokenizer.json").read_text())
    assert [(t["id"], t["content"]) for t in ours["added_tokens"]] == [
        (t["id"], t["content"]) for t in official["added_tokens"]
    ]
    assert [t["content"] for t in official["added_tokens"]] == llama3_special_tokens()
    for key in ("pre_tokenizer", "post_processor", "decoder", "normalizer"):
        assert ours[key] == official[key], key


def test_bench_preset_sizes_and_overrides(tmp_path: Path) -> None:
    bench = tiny_config("bench")
    assert (bench.hidden_size, bench.num_hidden_layers, bench.head_dim) == (512, 8, 64)
    assert bench.num_attention_heads // bench.num_key_value_heads == 4  # GQA group as the real model
    assert bench.num_image_tokens == 66 and bench.vision_config.num_positions == 257
    assert (bench.bos_token_id, bench.eos_token_id, bench.pad_token_id) == (3840, (3841, 3849), 3842)
    custom = tiny_config("tiny", vocab_size=1024, num_hidden_layers=3, vision_overrides={"image_size": 28})
    assert custom.pad_token_id == 770 and custom.num_image_tokens == 3
    assert custom.vision_config.num_positions == 5
    with pytest.raises(ValueError, match="preset"):
        tiny_config("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        tiny_config("tiny", hidden=3)
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_config("tiny", vocab_size=300)
    with pytest.raises(ValueError, match="allow_large"):
        make_tiny_checkpoint(tmp_path / "full", preset="full")
    assert not (tmp_path / "full" / "config.json").exists()


def test_bpe_reaches_any_vocab_size() -> None:
    vocab, merges = train_bpe("aaab abab", 300)
    assert len(vocab) == len(set(vocab)) == 300
    assert len(merges) == 300 - 256
    assert all(a + b in vocab for a, b in merges)


def test_cli_writes_a_sharded_bench_sized_tokenizer(tmp_path: Path) -> None:
    main([str(tmp_path / "cli"), "--dtype", "float16", "--shard-size", "300KB", "--set", "vocab_size=4096"])
    out = tmp_path / "cli"
    assert (out / "model.safetensors.index.json").is_file()
    config = ModelConfig.from_pretrained(out)
    assert config.vocab_size == 4096 and config.torch_dtype == "float16"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    assert len(tokenizer) == 4096 and tokenizer.bos_token_id == 3840
    ids = tokenizer(MIXED_TEXT, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == MIXED_TEXT


def test_tiny_checkpoint_loads_and_runs_a_forward(tiny_dir: Path, tmp_path: Path) -> None:
    from cogvlm_ray.hf import CogVLM2HFForCausalLM

    model = CogVLM2HFForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    on_disk = load_file(str(tiny_dir / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in on_disk.items())
    config = ModelConfig.from_pretrained(tiny_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_dir)
    text_ids = tokenizer("Question: What is in this picture? Answer:", add_special_tokens=False).input_ids
    num_image = config.num_image_tokens
    input_ids = torch.tensor([[config.bos_token_id] + [config.pad_token_id] * num_image + text_ids])
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[0, 1 : 1 + num_image] = 1
    image = torch.randn(3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=input_ids, token_type_ids=token_type_ids, images=[[image]]).logits
    assert logits.shape == (1, input_ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()
    # Random but not degenerate: next-token scores spread out like the official fixture's (std ~ a few).
    assert 0.5 < float(logits[0, -1].std()) < 50

    sharded = make_tiny_checkpoint(tmp_path / "bf16", seed=3, dtype="bfloat16", shard_size_bytes=300_000)
    bf16_model = CogVLM2HFForCausalLM.from_pretrained(sharded, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16_model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        bf16_logits = bf16_model(input_ids=input_ids, token_type_ids=token_type_ids, images=[[image]]).logits
    assert (bf16_logits - logits).abs().max() < 0.1 * logits.abs().max()
