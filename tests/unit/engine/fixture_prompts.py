"""PreparedPrompts built from the golden fixture cases (ids, token types, uint8 image)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file

from cogvlm_ray.contracts import PreparedPrompt
from cogvlm_ray.preprocess.images import pixel_hash, resize_to_uint8

CASES = ["chat_image", "base_image", "vqa_image", "chat_history_image", "text_only_chat"]


def load_case(fixture_dir: Path, name: str) -> tuple[PreparedPrompt, list[int], np.ndarray | None]:
    """(prompt, golden 12 greedy ids, the case's official pixel_values or None)."""
    meta = {c["name"]: c for c in json.loads((fixture_dir / "cases.json").read_text())["cases"]}[name]
    case = load_file(str(fixture_dir / "cases" / f"{name}.safetensors"))
    image = image_hash = None
    if meta["image"]:
        decoded = load_file(str(fixture_dir / "preprocess.safetensors"))[f"{meta['image']}.decoded_rgb_uint8"]
        image = resize_to_uint8(Image.fromarray(decoded.numpy()), 56)
        image_hash = pixel_hash(image)
    prompt = PreparedPrompt(
        input_ids=case["input_ids"].tolist(),
        token_type_ids=case["token_type_ids"].tolist(),
        image=image,
        image_hash=image_hash,
    )
    pixels = case["pixel_values"].numpy() if "pixel_values" in case else None
    return prompt, case["generated_ids"].tolist(), pixels


def text_prompt(token_ids: list[int]) -> PreparedPrompt:
    return PreparedPrompt(
        input_ids=token_ids, token_type_ids=[0] * len(token_ids), image=None, image_hash=None
    )
