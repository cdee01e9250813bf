"""Write a float CogVLM2 checkpoint as a pre-quantized bitsandbytes 4-bit checkpoint.

The layout transformers writes when it saves a bnb-quantized model, which is how
`THUDM/cogvlm2-llama3-chat-19B-int4` is stored; `load_model` reads it back (`quantization.py`).
Used by the tests on the tiny fixture, and to make one's own int4 checkpoint (e.g. LM only).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from cogvlm_ray.model.loading import INDEX_FILE, load_model
from cogvlm_ray.model.quantization import QuantizationSpec


def write_bnb_4bit_checkpoint(
    source: str | Path,
    target: str | Path,
    spec: QuantizationSpec | None = None,
    float_dtype: torch.dtype = torch.float16,
) -> Path:
    """Write `source` (a float CogVLM2 checkpoint) as a pre-quantized bnb 4-bit checkpoint.

    The route transformers takes for `save_pretrained` of a bnb-quantized model: load with the
    weights quantized, take the module state dict (bitsandbytes adds the packed weight and its
    quant-state tensors) and save it with safetensors, with `quantization_config` in config.json.
    The default spec is the official int4 one (fp4, float32 compute, uint8 storage, no double
    quant); float tensors are stored as `float_dtype` (fp16, as in the official checkpoint).
    """
    spec = spec or QuantizationSpec(
        method="bnb-4bit", bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype="float32"
    )
    source, target = Path(source), Path(target)
    model = load_model(source, dtype=float_dtype, quantization=spec)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    target.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = spec.to_hf_config()
    config["torch_dtype"] = str(float_dtype).removeprefix("torch.")
    (target / "config.json").write_text(json.dumps(config, indent=2))
    # Tokenizer and generation config; not the float weights' index, not the config written above.
    for file in source.iterdir():
        copy = file.is_file() and file.suffix in (".json", ".model", ".txt")
        if copy and file.name != INDEX_FILE and not (target / file.name).exists():
            shutil.copy(file, target / file.name)
    return target
