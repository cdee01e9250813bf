"""Quantization quality on the tiny fixture: top-1 agreement and KL against the float model.

For each quantization mode, load the fixture checkpoint (`tests/fixtures/cogvlm2-tiny`, random
weights) quantized, run the official forward on every fixture case and compare the logits at
every position with the official float32 logits stored in the fixture:

* top-1: fraction of positions whose argmax token equals the float model's;
* KL: mean over positions of KL(p_float || p_quant) in nats;
* max |dlogit|: the largest absolute logit difference;
* greedy: fraction of the 12 greedy tokens per case equal to the fixture's, position by position.

The tiny model has random weights, 64-wide layers and small logit margins, so these numbers
compare the modes with each other on this fixture only; they do not measure the real model's
quality. Runs on CPU in about a minute:

    PYTHONPATH=. python bench/quant_quality.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cogvlm_ray.hf import CogVLM2HFForCausalLM
from cogvlm_ray.model import CogVLM2ForCausalLM
from cogvlm_ray.model.quantization import QuantizationSpec
from cogvlm_ray.model.quantized_checkpoint import write_bnb_4bit_checkpoint

logger = logging.getLogger("bench.quant_quality")

FIXTURE_DIR = Path(__file__).parents[1] / "tests" / "fixtures" / "cogvlm2-tiny"
CASES = ("chat_image", "base_image", "vqa_image", "chat_history_image", "text_only_chat")
PAD_ID = 514

#: (row label, load_model kwargs); "int4 checkpoint" rows load a checkpoint written by
#: `write_bnb_4bit_checkpoint` (the official int4 route) instead of the float fixture.
MODES: list[tuple[str, dict]] = [
    ("float32 (reference run)", {}),
    ("bfloat16, not quantized", {"dtype": torch.bfloat16}),
    ("bnb-4bit nf4", {"quantization": "bnb-4bit"}),
    ("bnb-4bit nf4, vision float", {"quantization": "bnb-4bit", "quantize_vision": False}),
    ("bnb-4bit fp4", {"quantization": QuantizationSpec("bnb-4bit", bnb_4bit_quant_type="fp4")}),
    ("bnb-8bit", {"quantization": "bnb-8bit"}),
    ("bnb-8bit, vision float", {"quantization": "bnb-8bit", "quantize_vision": False}),
    ("int8-wo (torchao)", {"quantization": "int8-wo"}),
    ("int8-wo, vision float", {"quantization": "int8-wo", "quantize_vision": False}),
    ("int8-dq (torchao)", {"quantization": "int8-dq"}),
    ("int4 checkpoint (official layout: fp4, fp32 compute)", {"checkpoint": "int4"}),
    ("int4 checkpoint, vision float", {"checkpoint": "int4-vision-float"}),
]


@dataclass
class Quality:
    mode: str
    top1: float
    mean_kl: float
    max_abs_logit_diff: float
    greedy_match: float
    num_positions: int
    load_s: float


def case_inputs(case: dict[str, torch.Tensor]) -> dict:
    images = [[case["pixel_values"]]] if "pixel_values" in case else None
    return {
        "input_ids": case["input_ids"][None],
        "token_type_ids": case["token_type_ids"][None],
        "attention_mask": case["attention_mask"][None],
        "images": images,
    }


def logit_agreement(reference: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: top-1 equal (bool) and KL(p_ref || p_test) in nats, for logits `[L, V]`."""
    same = reference.argmax(-1) == test.argmax(-1)
    kl = F.kl_div(
        test.float().log_softmax(-1), reference.float().log_softmax(-1), log_target=True, reduction="none"
    )
    return same, kl.sum(-1)


@torch.no_grad()
def measure(model: CogVLM2ForCausalLM, mode: str, load_s: float) -> Quality:
    same, kls, diffs, greedy = [], [], [], []
    for name in CASES:
        case = load_file(str(FIXTURE_DIR / "cases" / f"{name}.safetensors"))
        inputs = case_inputs(case)
        logits = model(**inputs).logits[0].float()
        s, kl = logit_agreement(case["logits"], logits)
        same.append(s)
        kls.append(kl)
        diffs.append((logits - case["logits"]).abs().max())
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=PAD_ID)
        new = out[0, case["input_ids"].shape[0] :]
        golden = case["generated_ids"]
        greedy.append((new[: len(golden)] == golden[: len(new)]).float().sum() / len(golden))
    same_all, kl_all = torch.cat(same), torch.cat(kls)
    return Quality(
        mode=mode,
        top1=same_all.float().mean().item(),
        mean_kl=kl_all.mean().item(),
        max_abs_logit_diff=torch.stack(diffs).max().item(),
        greedy_match=torch.stack(greedy).mean().item(),
        num_positions=same_all.numel(),
        load_s=load_s,
    )


def load(kwargs: dict, scratch: Path) -> CogVLM2ForCausalLM:
    kwargs = dict(kwargs)
    checkpoint = kwargs.pop("checkpoint", None)
    if checkpoint is None:
        return CogVLM2HFForCausalLM.from_pretrained(FIXTURE_DIR, **{"dtype": torch.float32, **kwargs})
    directory = scratch / checkpoint
    if not directory.exists():
        skip = ("model.vision",) if checkpoint == "int4-vision-float" else ()
        spec = QuantizationSpec("bnb-4bit", skip, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype="float32")
        write_bnb_4bit_checkpoint(FIXTURE_DIR, directory, spec)
    return CogVLM2HFForCausalLM.from_pretrained(directory, dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    with TemporaryDirectory() as scratch:
        for mode, kwargs in MODES:
            start = time.perf_counter()
            model = load(kwargs, Path(scratch))
            rows.append(measure(model, mode, time.perf_counter() - start))
    print("| mode | top-1 agreement | mean KL (nats) | max abs logit diff | greedy tokens equal |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.mode} | {r.top1:.3f} | {max(r.mean_kl, 0.0):.4f} | {r.max_abs_logit_diff:.3f} | {r.greedy_match:.2f} |"
        )
    print(f"\n{rows[0].num_positions} positions over {len(CASES)} cases; torch {torch.__version__}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
