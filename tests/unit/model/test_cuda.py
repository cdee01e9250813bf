"""The same parity checks on a CUDA device (tiny fixture); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from cogvlm_ray.hf import CogVLM2HFForCausalLM

from .conftest import FIXTURE_DIR, PagedRunner, load_case, prompt_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_float32_parity_and_decode() -> None:
    model = CogVLM2HFForCausalLM.from_pretrained(FIXTURE_DIR, dtype=torch.float32, device_map="cuda:0")
    assert model.kv_cache_layout()[0][0].type == "cuda"
    for name in ("chat_image", "text_only_chat"):
        case = load_case(name)
        hidden = PagedRunner(model).step([("s", prompt_inputs(model, case))])[0]
        logits = model.compute_logits(hidden).cpu()
        # TF32 / kernel choice on GPU: a looser bound than the CPU tolerance.
        torch.testing.assert_close(logits, case["logits"], atol=2e-3, rtol=2e-3)
        images = [[case["pixel_values"].cuda()]] if "pixel_values" in case else None
        out = model.generate(
            input_ids=case["input_ids"][None].cuda(),
            token_type_ids=case["token_type_ids"][None].cuda(),
            attention_mask=case["attention_mask"][None].cuda(),
            images=images,
            max_new_tokens=12,
            pad_token_id=514,
            do_sample=False,
        )
        assert out[0, -12:].cpu().tolist() == case["generated_ids"].tolist()
