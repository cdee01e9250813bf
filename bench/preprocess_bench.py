"""Preprocessing benchmark: our uint8 path vs the official float32 path, one CPU thread.

    python bench/preprocess_bench.py [--repeats 15] [--image-size 1344]

Ours:     decode -> convert("RGB") -> bicubic resize -> uint8 [3, S, S] + content hash
Official: decode -> convert("RGB") -> bicubic resize -> float32 /255 -> CLIP normalise [3, S, S]
Both are timed end to end from the encoded bytes, in CPU time of the one thread (images/s =
1 / median CPU seconds); "incl. pickle" adds Ray-style serialisation of the result. Before
timing, the script checks that `normalize_image(ours)` is bit-identical to the official
float32 tensor for every input, and exits with status 1 if any differs.
Inputs are synthetic but photo/screenshot-like (gradients, shapes, sensor noise), generated
with a fixed seed: a 3000x2000 JPEG, a 1024x768 PNG, a 500x300 WebP.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import logging
import pickle
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.model.pixels import normalize_image, official_pixel_values
from cogvlm_ray.preprocess import PreprocessOptions, Preprocessor
from cogvlm_ray.preprocess.images import decode_image

logger = logging.getLogger("preprocess_bench")


def synthetic_photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients + random shapes + Gaussian sensor noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(x / (width / 3.1) + seed),
            128 + 100 * np.cos(y / (height / 2.3)),
            128 + 80 * np.sin((x + y) / (width / 5.7)),
        ],
        axis=-1,
    )
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, width // 4)), y0 + int(rng.integers(10, height // 4))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    noisy = np.asarray(image).astype(np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def synthetic_screenshot(width: int, height: int, seed: int) -> Image.Image:
    """Flat panels, text-like strokes and a little noise (compresses like a UI screenshot)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width - 50)), int(rng.integers(0, height - 50))
        color = tuple(int(c) for c in rng.integers(150, 256, 3))
        draw.rectangle((x0, y0, x0 + int(rng.integers(50, 400)), y0 + int(rng.integers(30, 200))), fill=color)
    for row in range(20, height - 20, 18):
        for col in range(20, width - 40, 9):
            if rng.random() < 0.6:
                draw.text((col, row), chr(int(rng.integers(65, 91))), fill=(20, 20, 20))
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-2, 3, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def make_inputs() -> dict[str, bytes]:
    return {
        "3000x2000 JPEG": encode(synthetic_photo(3000, 2000, 1), "JPEG", quality=90),
        "1024x768 PNG": encode(synthetic_screenshot(1024, 768, 2), "PNG"),
        "500x300 WebP": encode(synthetic_photo(500, 300, 3), "WEBP", quality=85),
    }


def our_path(data: bytes, image_size: int) -> np.ndarray:
    return decode_image(data, image_size=image_size, max_pixels=40_000_000).pixels


def official_path(data: bytes, image_size: int) -> torch.Tensor:
    """`Image.open(f).convert("RGB")` as the demos do, then the torchvision transform."""
    rgb = Image.open(io.BytesIO(data)).convert("RGB")
    return official_pixel_values(rgb, image_size)


def serialize(payload: object) -> int:
    """Pickle protocol 5 with out-of-band buffers, as Ray serialises task arguments/results.

    numpy arrays go out of band (zero-copy into the object store); torch tensors are pickled
    in band, i.e. copied (docs: shared/notes/ray-serve-facts.md section 3). Returns the bytes
    that had to be copied in band.
    """
    buffers: list[pickle.PickleBuffer] = []
    return len(pickle.dumps(payload, protocol=5, buffer_callback=buffers.append))


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (CPU seconds, wall seconds) per call; candidates alternate so drift hits both.

    CPU time of the calling thread is the primary figure: on a shared machine wall time also
    counts the time other processes held the core, while thread CPU time measures the work.
    """
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    wall: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start_cpu, start_wall = time.thread_time(), time.perf_counter()
            fn()
            cpu[name].append(time.thread_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    return {name: (statistics.median(cpu[name]), statistics.median(wall[name])) for name in fns}


def prepare_table(inputs: dict[str, bytes], repeats: int) -> list[str]:
    """Full `Preprocessor.prepare` from a data URL (base64, hash, decode, ids) at the real
    config's image size, with the decoded-image cache off (cold) and on (a resent image)."""
    fixture = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "cogvlm2-tiny"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(fixture))
    # Real sizes (1344, 2306 image positions) with the tiny vocabulary's special ids.
    config = dataclasses.replace(ModelConfig(), pad_token_id=514, bos_token_id=512, eos_token_id=(513, 521))
    lines = [
        "| input | prepare, cold (ms CPU) | prepare, cached image (ms CPU) | prompt tokens |",
        "|---|---|---|---|",
    ]
    for name, data in inputs.items():
        url = "data:image/*;base64," + base64.b64encode(data).decode()
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe this image."},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ]
        cold = Preprocessor(config, tokenizer, PreprocessOptions(image_cache_size=0))
        warm = Preprocessor(config, tokenizer, PreprocessOptions(image_cache_size=8))
        times = time_interleaved(
            {
                "cold": lambda p=cold, m=messages: p.prepare(m, max_tokens=256),
                "warm": lambda p=warm, m=messages: p.prepare(m, max_tokens=256),
            },
            repeats,
        )
        num_tokens = warm.prepare(messages, max_tokens=256).num_prompt_tokens
        lines.append(
            f"| {name} | {times['cold'][0] * 1e3:.1f} | {times['warm'][0] * 1e3:.1f} | {num_tokens} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--image-size", type=int, default=1344)
    parser.add_argument("--skip-prepare", action="store_true", help="skip the Preprocessor.prepare table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    size = args.image_size
    logger.info(
        "python %s, torch %s, one thread, image_size %d, %d repeats (median)",
        platform.python_version(),
        torch.__version__,
        size,
        args.repeats,
    )
    header = (
        "| input | encoded KiB | ours img/s | official img/s | speed-up | speed-up incl. pickle | "
        "speed-up wall | ours bytes | official bytes | bytes ratio | same pixels |"
    )
    lines = [header, "|" + "---|" * 11]
    all_same = True
    inputs = make_inputs()
    for name, data in inputs.items():
        ours = our_path(data, size)
        official = official_path(data, size)
        same = torch.equal(normalize_image(ours), official)
        times = time_interleaved(
            {
                "ours": lambda d=data: our_path(d, size),
                "official": lambda d=data: official_path(d, size),
                "ours+pickle": lambda d=data: serialize(our_path(d, size)),
                "official+pickle": lambda d=data: serialize(official_path(d, size)),
            },
            args.repeats,
        )
        cpu = {key: value[0] for key, value in times.items()}
        wall = {key: value[1] for key, value in times.items()}
        ours_bytes = ours.nbytes + 64  # pixels + hex hash
        official_bytes = official.numpy().nbytes
        lines.append(
            f"| {name} | {len(data) / 1024:.0f} | {1 / cpu['ours']:.1f} | {1 / cpu['official']:.1f} | "
            f"{cpu['official'] / cpu['ours']:.2f}x | {cpu['official+pickle'] / cpu['ours+pickle']:.2f}x | "
            f"{wall['official'] / wall['ours']:.2f}x | {ours_bytes:,} | {official_bytes:,} | "
            f"{official_bytes / ours_bytes:.2f}x | {'yes' if same else 'NO'} |"
        )
        all_same &= same
        if not same:
            logger.error("%s: normalize_image(uint8) differs from the official float32 tensor", name)
    logger.info("\n".join(lines))
    if not args.skip_prepare:
        logger.info("\n".join(prepare_table(inputs, args.repeats)))
    return 0 if all_same else 1


if __name__ == "__main__":
    raise SystemExit(main())
