"""GPU speed and memory of the quantization modes on a full-size, random-weight CogVLM2.

Prepared for a GPU machine; NOT run yet (no GPU was lent to the task that wrote it). For each mode
(bf16, bnb-4bit nf4 with bf16 compute, the official int4 settings fp4 with fp32 compute, bnb-8bit,
int8-wo, int8-dq, fp8 on compute capability >= 8.9) it:

1. builds the real-size model (config `real_config.json` of the fixture: 19B parameters) on the
   meta device and fills every tensor with random values directly on the GPU, passing each Linear
   weight through the same `WeightQuantizer.take` the checkpoint loader uses (no 39 GB file to write);
2. records weight memory (`torch.cuda.memory_allocated`) and the peak while building;
3. times one 1344x1344 image through the vision tower, a prefill of `--batch` x `--prompt-len`
   text tokens, and greedy-free decode steps (random next ids) at batch 1 and at `--batch`,
   through `forward_flat` + `compute_logits` over a paged KV cache, as the engine runs them.

    python bench/quant_gpu.py --json /tmp/quant_gpu.json                  # all modes, ~5-8 min on H100
    python bench/quant_gpu.py --modes bf16,bnb-4bit,int8-wo --decode-steps 32
    python bench/quant_gpu.py --preset tiny --device cpu --modes bf16,int8-wo   # smoke test on CPU

Prints one markdown table (and JSON with --json). Tokens/s are model-only (no scheduler, no HTTP).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.model import AttentionMetadata, CogVLM2ForCausalLM
from cogvlm_ray.model.loading import build_meta_model, set_tensor
from cogvlm_ray.model.quantization import QuantizationSpec, build_quantizer
from cogvlm_ray.model.random_init import init_parameter_

logger = logging.getLogger("bench.quant_gpu")

FIXTURE_DIR = Path(__file__).parents[1] / "tests" / "fixtures" / "cogvlm2-tiny"
OFFICIAL_INT4 = QuantizationSpec("bnb-4bit", bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype="float32")
MODES: dict[str, str | QuantizationSpec | None] = {
    "bf16": None,
    "bnb-4bit": "bnb-4bit",
    "bnb-4bit-official": OFFICIAL_INT4,
    "bnb-8bit": "bnb-8bit",
    "int8-wo": "int8-wo",
    "int8-dq": "int8-dq",
    "fp8": "fp8",
}
BLOCK_SIZE = 16


@dataclass
class Row:
    mode: str
    weight_gib: float
    build_peak_gib: float
    image_encode_ms: float
    prefill_tokens_per_s: float
    decode_tokens_per_s_batch1: float
    decode_tokens_per_s_batchN: float
    batch: int
    build_s: float


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(num_bytes: float) -> float:
    return num_bytes / 2**30


def build_random(config: ModelConfig, mode: str, device: torch.device) -> CogVLM2ForCausalLM:
    """The model with random weights made on `device`, quantized per tensor as the loader would."""
    dtype = torch.bfloat16
    model = build_meta_model(config)
    quantizer = build_quantizer(MODES[mode], None, dtype)
    if quantizer is not None:
        quantizer.prepare(model, [device])
    generator = torch.Generator(device=device).manual_seed(0)
    for key, meta in list(model.state_dict(keep_vars=True).items()):
        if key.endswith(".rotary_emb.inv_freq"):
            rotary = model.get_submodule(key.rsplit(".", 1)[0])
            set_tensor(model, key, rotary.textbook_inv_freq(device).to(dtype))
            continue
        value = torch.empty(meta.shape, device=device, dtype=dtype)
        init_parameter_(key, value, generator)
        if quantizer is not None and quantizer.claims(key, dtype):
            quantizer.take(key, value, device)
        else:
            set_tensor(model, key, value)
        del value
    model.hf_device_map = {"": str(device)}
    return model.eval()


def make_caches(model: CogVLM2ForCausalLM, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = model.model_config
    shape = (num_blocks, BLOCK_SIZE, cfg.num_multi_query_heads, cfg.head_dim)
    return [
        (torch.zeros(shape, device=d, dtype=t), torch.zeros(shape, device=d, dtype=t))
        for d, t in model.kv_cache_layout()
    ]


@torch.no_grad()
def time_steps(
    model: CogVLM2ForCausalLM, batch: int, prompt_len: int, decode_steps: int, device: torch.device
) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) for `batch` text sequences of `prompt_len` tokens."""
    vocab = model.model_config.vocab_size
    blocks_per_seq = -(-(prompt_len + decode_steps + 1) // BLOCK_SIZE)
    caches = make_caches(model, batch * blocks_per_seq + 1)
    tables = [list(range(1 + b * blocks_per_seq, 1 + (b + 1) * blocks_per_seq)) for b in range(batch)]
    ids = torch.randint(0, vocab, (batch * prompt_len,), device=device)
    positions = torch.arange(prompt_len, device=device).repeat(batch)
    no_vision = torch.zeros(batch * prompt_len, dtype=torch.bool, device=device)
    meta = AttentionMetadata.build([prompt_len] * batch, [0] * batch, tables, BLOCK_SIZE, device)
    sync(device)
    start = time.perf_counter()
    hidden = model.forward_flat(ids, positions, no_vision, caches, meta)
    model.compute_logits(hidden[prompt_len - 1 :: prompt_len])
    sync(device)
    prefill_s = time.perf_counter() - start
    step_ids = torch.randint(0, vocab, (batch,), device=device)
    no_vision = torch.zeros(batch, dtype=torch.bool, device=device)
    elapsed = 0.0
    for step in range(decode_steps + 1):
        context = prompt_len + step
        meta = AttentionMetadata.build([1] * batch, [context] * batch, tables, BLOCK_SIZE, device)
        positions = torch.full((batch,), context, device=device)
        sync(device)
        start = time.perf_counter()
        logits = model.compute_logits(model.forward_flat(step_ids, positions, no_vision, caches, meta))
        step_ids = logits.argmax(-1)
        sync(device)
        if step:  # the first decode step warms up kernels / caches
            elapsed += time.perf_counter() - start
    del caches
    return batch * prompt_len / prefill_s, batch * decode_steps / elapsed


@torch.no_grad()
def time_image(model: CogVLM2ForCausalLM, device: torch.device) -> float:
    size = model.model_config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, device=device)
    model.encode_images(pixels)  # warm-up
    sync(device)
    start = time.perf_counter()
    model.encode_images(pixels)
    sync(device)
    return (time.perf_counter() - start) * 1000


def run_mode(mode: str, config: ModelConfig, device: torch.device, args: argparse.Namespace) -> Row:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    start = time.perf_counter()
    model = build_random(config, mode, device)
    sync(device)
    build_s = time.perf_counter() - start
    weights = torch.cuda.memory_allocated(device) - base if device.type == "cuda" else 0
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
    image_ms = time_image(model, device)
    time_steps(model, 1, 16, 2, device)  # warm-up (kernel selection, allocator)
    prefill, decode_1 = time_steps(model, 1, args.prompt_len, args.decode_steps, device)
    _, decode_n = time_steps(model, args.batch, args.prompt_len, args.decode_steps, device)
    if args.batch > 1:
        prefill, _ = time_steps(model, args.batch, args.prompt_len, 1, device)
    del model
    gc.collect()
    return Row(mode, gib(weights), gib(peak), image_ms, prefill, decode_1, decode_n, args.batch, build_s)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {list(MODES)}")
    parser.add_argument("--preset", choices=["real", "tiny"], default="real")
    parser.add_argument("--num-layers", type=int, help="override num_hidden_layers (quicker runs)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device(args.device)
    raw = json.loads(
        (FIXTURE_DIR / ("real_config.json" if args.preset == "real" else "config.json")).read_text()
    )
    if args.num_layers:
        raw["num_hidden_layers"] = args.num_layers
    config = ModelConfig.from_dict(raw)
    rows: list[Row] = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {list(MODES)}")
        try:
            rows.append(run_mode(mode, config, device, args))
        except (ValueError, RuntimeError, ImportError) as exc:  # e.g. fp8 before Ada/Hopper
            logger.warning("mode %s skipped: %s", mode, exc)
            gc.collect()
            continue
        logger.info("%s", asdict(rows[-1]))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; preset {args.preset}; prompt {args.prompt_len}")
    print(
        "| mode | weights GiB | build peak GiB | image ms | prefill tok/s | decode tok/s b=1 | decode tok/s b=N |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.mode} | {r.weight_gib:.1f} | {r.build_peak_gib:.1f} | {r.image_encode_ms:.0f} | "
            f"{r.prefill_tokens_per_s:.0f} | {r.decode_tokens_per_s_batch1:.1f} | {r.decode_tokens_per_s_batchN:.1f} (N={r.batch}) |"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
