"""Fixtures for the quantization tests: the tiny fixture's cases, float references, int4 checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cogvlm_ray.model import CogVLM2ForCausalLM
from cogvlm_ray.model.quantization import QuantizationSpec
from cogvlm_ray.model.quantized_checkpoint import write_bnb_4bit_checkpoint

FIXTURE_DIR = Path(__file__).parents[2] / "fixtures" / "cogvlm2-tiny"
CASES = ["chat_image", "base_image", "vqa_image", "chat_history_image", "text_only_chat"]
PAD_ID = 514

#: The `quantization_config` of THUDM/cogvlm2-llama3-chat-19B-int4, as published with the checkpoint.
OFFICIAL_INT4_CONFIG = {
    "quant_method": "bitsandbytes",
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "fp4",
    "bnb_4bit_compute_dtype": "float32",
    "bnb_4bit_quant_storage": "uint8",
    "bnb_4bit_use_double_quant": False,
    "llm_int8_skip_modules": None,
}


def official_int4_spec(**changes) -> QuantizationSpec:
    return QuantizationSpec.from_hf_config({**OFFICIAL_INT4_CONFIG, **changes})


@pytest.fixture(scope="session")
def cases() -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(FIXTURE_DIR / "cases" / f"{name}.safetensors")) for name in CASES}


def case_inputs(case: dict[str, torch.Tensor]) -> dict:
    """The official forward / generate inputs of one fixture case (batch of 1)."""
    return {
        "input_ids": case["input_ids"][None],
        "token_type_ids": case["token_type_ids"][None],
        "attention_mask": case["attention_mask"][None],
        "images": [[case["pixel_values"]]] if "pixel_values" in case else None,
    }


@torch.no_grad()
def all_logits(model: CogVLM2ForCausalLM, cases: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
    """Logits at every position of every case, concatenated: `[sum L, V]` float32."""
    return torch.cat([model(**case_inputs(c)).logits[0].float() for c in cases.values()])


def golden_logits(cases: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([c["logits"] for c in cases.values()])


def agreement(reference: torch.Tensor, test: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(p_ref || p_test) in nats) over all positions."""
    top1 = (reference.argmax(-1) == test.argmax(-1)).float().mean().item()
    kl = F.kl_div(test.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none")
    return top1, kl.sum(-1).mean().item()


@pytest.fixture(scope="session")
def int4_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture written like the official int4 checkpoint (fp4, fp32 compute, fp16 floats)."""
    return write_bnb_4bit_checkpoint(
        FIXTURE_DIR, tmp_path_factory.mktemp("int4") / "ckpt", official_int4_spec()
    )
