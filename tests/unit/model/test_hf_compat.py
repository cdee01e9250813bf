"""The Hugging Face drop-in: the seed model card's quickstart runs with only its loading line changed."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.hf import CogVLM2HFForCausalLM
from cogvlm_ray.model import CogVLM2ForCausalLM

from .conftest import FIXTURE_DIR, load_case

TEXT_ONLY_TEMPLATE = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: {} ASSISTANT:"
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(FIXTURE_DIR))


def _quickstart(model: CogVLM2HFForCausalLM, tokenizer, case: dict, max_new_tokens: int) -> torch.Tensor:
    """The model card's loop body, verbatim apart from the fixture's ids and token budget."""
    device = "cpu"
    torch_type = torch.float32
    image = None
    if case["image"] is not None:
        image = Image.open(
            FIXTURE_DIR / "images" / f"{case['image']}{'.jpg' if 'odd' in case['image'] else '.png'}"
        )
        image = image.convert("RGB")
    if image is None:
        input_by_model = model.build_conversation_input_ids(
            tokenizer, query=case["query"], history=case["history"], template_version=case["template"]
        )
    else:
        input_by_model = model.build_conversation_input_ids(
            tokenizer,
            query=case["query"],
            history=case["history"],
            images=[image],
            template_version=case["template"],
        )
    inputs = {
        "input_ids": input_by_model["input_ids"].unsqueeze(0).to(device),
        "token_type_ids": input_by_model["token_type_ids"].unsqueeze(0).to(device),
        "attention_mask": input_by_model["attention_mask"].unsqueeze(0).to(device),
        "images": [[input_by_model["images"][0].to(device).to(torch_type)]] if image is not None else None,
    }
    gen_kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": 514}
    with torch.no_grad():
        outputs = model.generate(**inputs, **gen_kwargs)
        return outputs[:, inputs["input_ids"].shape[1] :]


def test_quickstart_flow_gives_official_greedy_tokens(tokenizer, cases_json: dict) -> None:
    # The one changed line (AutoModelForCausalLM -> CogVLM2HFForCausalLM):
    model = CogVLM2HFForCausalLM.from_pretrained(
        FIXTURE_DIR, torch_dtype=torch.float32, trust_remote_code=True
    ).eval()
    assert isinstance(model, CogVLM2ForCausalLM)  # the core model underneath
    for case in cases_json["cases"]:
        history = [tuple(turn) for turn in case["history"]]
        image_file = cases_json["preprocess"][case["image"]]["file"] if case["image"] else None
        new_tokens = _quickstart(
            model, tokenizer, {**case, "history": history, "image_file": image_file}, max_new_tokens=12
        )
        assert new_tokens[0].tolist() == case["generated_ids"], case["name"]
        text = tokenizer.decode(new_tokens[0]).split("<|end_of_text|>")[0]
        assert isinstance(text, str)


def test_from_pretrained_is_load_model() -> None:
    model = CogVLM2HFForCausalLM.from_pretrained(
        str(FIXTURE_DIR), torch_dtype=torch.bfloat16, trust_remote_code=True
    )
    assert model.dtype == torch.bfloat16 and not model.training


def test_generate_with_sampling_flag_and_stop_ids(tiny_hf_model: CogVLM2HFForCausalLM) -> None:
    case = load_case("text_only_chat")
    inputs = {
        "input_ids": case["input_ids"][None],
        "token_type_ids": case["token_type_ids"][None],
        "attention_mask": case["attention_mask"][None],
        "images": None,
    }
    greedy = tiny_hf_model.generate(**inputs, max_new_tokens=5, pad_token_id=514, do_sample=False)
    assert greedy[0, -5:].tolist() == case["generated_ids"][:5].tolist()
    torch.manual_seed(0)
    sampled = tiny_hf_model.generate(**inputs, max_new_tokens=5, pad_token_id=514, do_sample=True, top_k=5)
    assert sampled.shape == (1, case["input_ids"].shape[0] + 5)
    # Forcing a stop id as the first token ends generation right there.
    stop = int(case["generated_ids"][0])
    stopped = tiny_hf_model.generate(**inputs, max_new_tokens=5, pad_token_id=514, eos_token_id=[stop])
    assert stopped.shape[1] == case["input_ids"].shape[0] + 1


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_generates_like_single_runs(tiny_hf_model: CogVLM2HFForCausalLM, side: str) -> None:
    """Unlike the official code, a shorter right-padded row continues from its own last token;
    left padding gives the same positions as no padding."""
    names = ["chat_image", "chat_history_image"]
    cases = [load_case(n) for n in names]
    length = max(c["input_ids"].shape[0] for c in cases)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        fill = torch.full((length - t.shape[0],), value, dtype=t.dtype)
        return torch.cat([t, fill] if side == "right" else [fill, t])

    out = tiny_hf_model.generate(
        input_ids=torch.stack([pad(c["input_ids"], 513) for c in cases]),
        token_type_ids=torch.stack([pad(c["token_type_ids"], 0) for c in cases]),
        attention_mask=torch.stack([pad(c["attention_mask"], 0) for c in cases]),
        images=[[c["pixel_values"]] for c in cases],
        max_new_tokens=12,
        pad_token_id=514,
        do_sample=False,
    )
    for row, case in zip(out, cases, strict=True):
        assert row[length:].tolist() == case["generated_ids"].tolist()


def test_forward_rejects_images_missing(tiny_hf_model: CogVLM2HFForCausalLM) -> None:
    case = load_case("chat_image")
    with pytest.raises(ValueError, match="images"):
        tiny_hf_model(
            input_ids=case["input_ids"][None], token_type_ids=case["token_type_ids"][None], images=None
        )


def test_pad_columns_repeat_the_rows_last_real_logits(tiny_hf_model: CogVLM2HFForCausalLM) -> None:
    case = load_case("text_only_chat")
    ids = torch.cat([case["input_ids"], torch.tensor([513, 513])])[None]
    mask = torch.cat([case["attention_mask"], torch.zeros(2, dtype=torch.long)])[None]
    logits = tiny_hf_model(input_ids=ids, attention_mask=mask).logits[0]
    torch.testing.assert_close(logits[-1], logits[-3])
    torch.testing.assert_close(logits[-2], logits[-3])
    last_only = tiny_hf_model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
    assert last_only.shape == (1, 1, logits.shape[-1])
    torch.testing.assert_close(last_only[0, 0], logits[-3])


def test_beam_search_scores_match_a_full_recompute(tiny_hf_model: CogVLM2HFForCausalLM) -> None:
    """Beam search reorders the cache every step; the returned sequence scores must equal the
    log-probabilities of the returned sequences recomputed without any cache."""
    case = load_case("chat_image")
    length = case["input_ids"].shape[0]
    out = tiny_hf_model.generate(
        input_ids=case["input_ids"][None],
        token_type_ids=case["token_type_ids"][None],
        attention_mask=case["attention_mask"][None],
        images=[[case["pixel_values"]]],
        max_new_tokens=6,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        pad_token_id=514,
        eos_token_id=[513],
        length_penalty=0.0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert out.sequences.shape == (2, length + 6)
    for sequence, score in zip(out.sequences, out.sequences_scores, strict=True):
        types = torch.cat([case["token_type_ids"], torch.zeros(6, dtype=torch.long)])
        logits = tiny_hf_model(
            input_ids=sequence[None], token_type_ids=types[None], images=[[case["pixel_values"]]]
        ).logits[0]
        logprobs = torch.log_softmax(logits[length - 1 : -1], dim=-1)
        total = logprobs.gather(1, sequence[length:, None]).sum()
        torch.testing.assert_close(total, score, atol=1e-3, rtol=1e-4)
