"""Weight quantization while the checkpoint streams in: bitsandbytes 4/8-bit, torchao int8 / fp8.

Owns: which `nn.Linear` layers are quantized (all of them except `lm_head` and any skipped
prefix, e.g. the vision tower), turning each layer's weight into its quantized form the moment
`loading.py` reads it (so a bf16 checkpoint never sits in memory unquantized), and reading
checkpoints that are already bitsandbytes-4-bit (the layout transformers writes, which is how
`THUDM/cogvlm2-llama3-chat-19B-int4` is stored: packed uint8 `X.weight` plus `X.weight.absmax`,
`X.weight.quant_map`, `X.weight.quant_state.bitsandbytes__fp4`). `quantized_checkpoint.py`
writes that layout.

Does not own: file reading, strictness and device placement (`loading.py`, `sharding.py`).
Quantized layers keep the `nn.Linear` call interface, so the model, engine, image cache and
device maps need no changes. bitsandbytes and torchao are optional (extra `quant`) and
imported only when a quantized load is asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: `quantization=` values. int8-wo / int8-dq / fp8 are torchao; fp8 needs CUDA compute capability >= 8.9.
QUANTIZATION_METHODS = ("none", "bnb-4bit", "bnb-8bit", "int8-wo", "int8-dq", "fp8")
BNB_METHODS = ("bnb-4bit", "bnb-8bit")
#: Kept in float whatever the method: transformers keeps the output embedding unquantized
#: (`get_keys_to_not_convert`), and the official int4 checkpoint was written that way.
ALWAYS_SKIPPED = ("lm_head",)
VISION_PREFIX = "model.vision"
#: Parts of a pre-quantized bnb 4-bit weight, beside `X.weight`, by suffix after `X.weight.`.
BNB_4BIT_PARTS = ("absmax", "quant_map")
BNB_4BIT_NESTED_PARTS = ("nested_absmax", "nested_quant_map")
BNB_4BIT_STATE_PREFIX = "quant_state.bitsandbytes__"


@dataclass(frozen=True)
class QuantizationSpec:
    """How to quantize (or how a checkpoint was quantized). `method` is one of QUANTIZATION_METHODS."""

    method: str
    skip_modules: tuple[str, ...] = ()
    """Module-name prefixes kept in float, beside `lm_head` (e.g. `model.vision`)."""
    prequantized: bool = False
    """The checkpoint stores bnb 4-bit weights (from its config.json `quantization_config`)."""
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: str | None = None
    """None: the model dtype. The official int4 checkpoint says float32."""
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: str = "uint8"
    bnb_4bit_blocksize: int = 64
    llm_int8_threshold: float = 6.0

    @classmethod
    def parse(cls, value: str | QuantizationSpec, quantize_vision: bool = True) -> QuantizationSpec:
        """A method name (or a spec) plus the vision switch -> a validated spec."""
        spec = value if isinstance(value, QuantizationSpec) else cls(method=str(value).strip().lower())
        spec = replace(spec, prequantized=False)  # a request quantizes float weights on the fly
        if not quantize_vision and VISION_PREFIX not in spec.skip_modules:
            spec = replace(spec, skip_modules=(*spec.skip_modules, VISION_PREFIX))
        spec.validate()
        return spec

    @classmethod
    def from_hf_config(cls, raw: dict[str, Any]) -> QuantizationSpec:
        """A checkpoint's `quantization_config` (transformers' BitsAndBytesConfig dict)."""
        method = raw.get("quant_method", "bitsandbytes")
        if method != "bitsandbytes":
            raise ValueError(
                f"unsupported pre-quantized checkpoint: quant_method={method!r} (only bitsandbytes)"
            )
        if not raw.get("load_in_4bit"):
            raise ValueError(
                "pre-quantized bitsandbytes 8-bit checkpoints are not supported; "
                "load the float checkpoint with quantization='bnb-8bit'"
            )
        spec = cls(
            method="bnb-4bit",
            skip_modules=tuple(raw.get("llm_int8_skip_modules") or ()),
            prequantized=True,
            bnb_4bit_quant_type=raw.get("bnb_4bit_quant_type", "fp4"),
            bnb_4bit_compute_dtype=raw.get("bnb_4bit_compute_dtype") or "float32",
            bnb_4bit_use_double_quant=bool(raw.get("bnb_4bit_use_double_quant", False)),
            bnb_4bit_quant_storage=raw.get("bnb_4bit_quant_storage") or "uint8",
        )
        spec.validate()
        return spec

    def to_hf_config(self) -> dict[str, Any]:
        """The `quantization_config` transformers writes for this bnb 4-bit spec."""
        if self.method != "bnb-4bit":
            raise ValueError("only bnb-4bit checkpoints can be written pre-quantized")
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_compute_dtype": self.bnb_4bit_compute_dtype or "float32",
            "bnb_4bit_quant_storage": self.bnb_4bit_quant_storage,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": [m for m in self.skip_modules if m not in ALWAYS_SKIPPED] or None,
            "llm_int8_threshold": self.llm_int8_threshold,
        }

    def validate(self) -> None:
        if self.method not in QUANTIZATION_METHODS:
            raise ValueError(f"unknown quantization {self.method!r}; choose from {QUANTIZATION_METHODS}")
        if self.bnb_4bit_quant_type not in ("fp4", "nf4"):
            raise ValueError(f"bnb_4bit_quant_type must be fp4 or nf4, got {self.bnb_4bit_quant_type!r}")
        for name in (self.bnb_4bit_compute_dtype, self.bnb_4bit_quant_storage):
            if name is not None and not isinstance(getattr(torch, name, None), torch.dtype):
                raise ValueError(f"unknown dtype {name!r} in the quantization settings")
        if self.prequantized and self.method != "bnb-4bit":
            raise ValueError("only bnb-4bit checkpoints can be pre-quantized")

    def is_skipped(self, module_name: str) -> bool:
        return any(
            module_name == p or module_name.startswith(p + ".") for p in (*ALWAYS_SKIPPED, *self.skip_modules)
        )


def resolve_quantization(
    requested: str | QuantizationSpec | None,
    checkpoint_config: dict[str, Any] | None,
    quantize_vision: bool = True,
) -> QuantizationSpec | None:
    """What to do for `load_model(quantization=requested)` on a checkpoint with this `quantization_config`.

    A pre-quantized checkpoint is read as stored (requested: None, "none", "auto" or "bnb-4bit";
    "none" means no on-the-fly quantization); a float checkpoint is quantized on the fly with
    `requested` (None / "none" / "auto": not at all).
    """
    name = requested.method if isinstance(requested, QuantizationSpec) else requested
    name = name.strip().lower() if isinstance(name, str) else name
    if checkpoint_config is not None:
        spec = QuantizationSpec.from_hf_config(checkpoint_config)
        if name not in (None, "none", "auto", "bnb-4bit"):
            raise ValueError(
                f"this checkpoint is already quantized (bitsandbytes 4-bit); quantization={name!r} "
                "cannot be applied to it: pass quantization=None or load the float checkpoint"
            )
        if not quantize_vision and not spec.is_skipped(VISION_PREFIX):
            raise ValueError(
                "quantize_vision=False cannot apply to a pre-quantized checkpoint whose vision tower is "
                "quantized; its quantization_config decides (llm_int8_skip_modules)"
            )
        return spec
    if name in (None, "none", "auto"):
        return None
    return QuantizationSpec.parse(requested, quantize_vision)


def build_quantizer(
    requested: str | QuantizationSpec | None,
    checkpoint_config: dict[str, Any] | None,
    dtype: torch.dtype,
    quantize_vision: bool = True,
) -> WeightQuantizer | None:
    """The quantizer `load_model` drives, or None for a plain float load."""
    spec = resolve_quantization(requested, checkpoint_config, quantize_vision)
    return None if spec is None else WeightQuantizer(spec, dtype)


def _torch_dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    return default if name is None else getattr(torch, name)


def _torchao_config(method: str) -> Any:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    if method == "int8-wo":
        return Int8WeightOnlyConfig()
    if method == "int8-dq":
        return Int8DynamicActivationInt8WeightConfig()
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def check_fp8_device(device: torch.device) -> None:
    """fp8 matmuls (`torch._scaled_mm`) need an Ada / Hopper GPU or newer."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"quantization='fp8' needs a CUDA GPU with compute capability >= 8.9, not {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(f"quantization='fp8' needs compute capability >= 8.9; {device} has {capability}")


class WeightQuantizer:
    """Quantizes the target `nn.Linear` layers of a meta-device model as `loading.py` streams tensors.

    Protocol (driven by `load_weights`): `prepare(model, devices)`, then per checkpoint tensor
    `claims(key, dtype)` -> `check(key, shape)` (a problem message or None) -> `take(key, tensor,
    device)`, then `finish()` (a problem message or None). Unclaimed keys load as usual.
    """

    def __init__(self, spec: QuantizationSpec, dtype: torch.dtype):
        self.spec = spec
        self.dtype = dtype
        self.model: nn.Module | None = None
        self.targets: dict[str, nn.Linear] = {}
        self.num_quantized = 0
        self._parts: dict[str, dict[str, torch.Tensor]] = {}
        self._ao_config: Any = None

    # ---- set-up ------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, devices: Iterable[str | int | torch.device]) -> None:
        """Pick the target layers and check that the method runs on `devices` (device-map values)."""
        from cogvlm_ray.model.sharding import normalize_device

        self.model = model
        self.targets = {
            name: module
            for name, module in model.named_modules()
            if type(module) is nn.Linear and not self.spec.is_skipped(name)
        }
        method = self.spec.method
        if method in BNB_METHODS:
            import bitsandbytes  # noqa: F401  (fail now, with a clear error, not mid-load)

            if method == "bnb-8bit":
                # LLM.int8 casts bf16 / fp32 activations to fp16 and logs a warning on every matmul.
                logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        else:
            if method == "fp8":
                if self.dtype != torch.bfloat16:
                    raise ValueError(f"quantization='fp8' needs dtype bfloat16, not {self.dtype}")
                for device in devices:
                    check_fp8_device(normalize_device(device))
            self._ao_config = _torchao_config(method)
        logger.info("quantizing %d Linear layers with %s (%s kept in float)", len(self.targets), method,
                    ", ".join((*ALWAYS_SKIPPED, *self.spec.skip_modules)))  # fmt: skip

    # ---- per tensor --------------------------------------------------------------------------
    def split_key(self, key: str) -> tuple[str, str] | None:
        """`X.weight[.part]` of a target layer X -> (X, part or ""); anything else -> None."""
        module_name, sep, rest = key.partition(".weight")
        if not sep or module_name not in self.targets or (rest and not rest.startswith(".")):
            return None
        return module_name, rest[1:]

    def claims(self, key: str, dtype: torch.dtype) -> bool:
        """Whether this checkpoint tensor is ours rather than a plain parameter."""
        split = self.split_key(key)
        if split is None:
            return False
        if not self.spec.prequantized:
            return split[1] == ""
        # A pre-quantized checkpoint may keep some target layers in float: their plain float
        # `X.weight` loads as usual and the layer stays nn.Linear.
        return split[1] != "" or not dtype.is_floating_point

    def check(self, key: str, shape: tuple[int, ...]) -> str | None:
        """Shape / name check of a claimed tensor before anything is read."""
        module_name, part = self.split_key(key)  # type: ignore[misc]
        linear = self.targets[module_name]
        if not self.spec.prequantized:
            want = tuple(linear.weight.shape)
            return None if shape == want else f"shape mismatch for {key!r}: checkpoint {shape}, model {want}"
        if part == "":
            storage = _torch_dtype(self.spec.bnb_4bit_quant_storage, torch.uint8)
            num_bytes = (linear.weight.numel() + 1) // 2
            want = ((num_bytes + storage.itemsize - 1) // storage.itemsize, 1)
            return None if shape == want else f"packed 4-bit {key!r} has shape {shape}, expected {want}"
        allowed = (
            *BNB_4BIT_PARTS,
            *BNB_4BIT_NESTED_PARTS,
            BNB_4BIT_STATE_PREFIX + self.spec.bnb_4bit_quant_type,
        )
        return None if part in allowed else f"unexpected quantization tensor {key!r}"

    def take(self, key: str, tensor: torch.Tensor, device: torch.device) -> None:
        """Consume one claimed tensor read from the checkpoint (on CPU), placing the result on `device`."""
        module_name, part = self.split_key(key)  # type: ignore[misc]
        if self.spec.prequantized:
            self._parts.setdefault(module_name, {})[part] = tensor
            self._build_prequantized(module_name, device)
            return
        weight = tensor.to(dtype=self.dtype)
        if self.spec.method == "bnb-4bit":
            self._swap(module_name, self._bnb_4bit_from_float(module_name, weight, device))
        elif self.spec.method == "bnb-8bit":
            self._swap(module_name, self._bnb_8bit_from_float(module_name, weight, device))
        else:
            from torchao.quantization import quantize_

            linear = self.targets[module_name]
            linear._parameters["weight"] = nn.Parameter(weight.to(device), requires_grad=False)
            quantize_(linear, self._ao_config)
        self.num_quantized += 1

    def finish(self) -> str | None:
        """After the last file: every pre-quantized layer must have all its parts."""
        if self._parts:
            module_name, parts = next(iter(self._parts.items()))
            missing = sorted(set(self._required_parts()) - set(parts))
            names = ", ".join(f"weight.{p}" if p else "weight" for p in missing)
            return f"quantized layer {module_name!r} lacks {names} ({len(self._parts)} layers incomplete)"
        logger.info("%d Linear layers quantized (%s)", self.num_quantized, self.spec.method)
        return None

    # ---- bitsandbytes layers -------------------------------------------------------------------
    def _required_parts(self) -> tuple[str, ...]:
        nested = BNB_4BIT_NESTED_PARTS if self.spec.bnb_4bit_use_double_quant else ()
        return ("", *BNB_4BIT_PARTS, *nested, BNB_4BIT_STATE_PREFIX + self.spec.bnb_4bit_quant_type)

    def _new_linear_4bit(self, module_name: str) -> nn.Module:
        import bitsandbytes as bnb

        linear = self.targets[module_name]
        module = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=_torch_dtype(self.spec.bnb_4bit_compute_dtype, self.dtype),
            compress_statistics=self.spec.bnb_4bit_use_double_quant,
            quant_type=self.spec.bnb_4bit_quant_type,
            quant_storage=_torch_dtype(self.spec.bnb_4bit_quant_storage, torch.uint8),
            device="meta",
        )
        if linear.in_features % self.spec.bnb_4bit_blocksize:
            # bitsandbytes' packed CPU kernel views absmax as [out, in / blocksize]; layers
            # narrower than a block (the tiny fixture's vision tower) take its generic path.
            module.support_avx512bf16_for_cpu = False
        return module

    def _bnb_4bit_from_float(self, module_name: str, weight: torch.Tensor, device: torch.device) -> nn.Module:
        import bitsandbytes as bnb

        module = self._new_linear_4bit(module_name)
        param = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            quant_type=self.spec.bnb_4bit_quant_type,
            blocksize=self.spec.bnb_4bit_blocksize,
            compress_statistics=self.spec.bnb_4bit_use_double_quant,
            quant_storage=_torch_dtype(self.spec.bnb_4bit_quant_storage, torch.uint8),
            module=module,
        )
        module._parameters["weight"] = param.to(device)  # .to() quantizes, on the target device
        return module

    def _bnb_8bit_from_float(self, module_name: str, weight: torch.Tensor, device: torch.device) -> nn.Module:
        import bitsandbytes as bnb

        linear = self.targets[module_name]
        module = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=self.spec.llm_int8_threshold,
            device="meta",
        )
        param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        module._parameters["weight"] = param.to(device)  # .to() quantizes row-wise to int8 + SCB
        return module

    def _build_prequantized(self, module_name: str, device: torch.device) -> None:
        import bitsandbytes as bnb

        parts = self._parts[module_name]
        if set(parts) != set(self._required_parts()):
            return  # wait for the rest (they may come later, or in another shard)
        del self._parts[module_name]
        data = parts.pop("")
        module = self._new_linear_4bit(module_name)
        stats = {f"weight.{part}": value for part, value in parts.items()}
        module._parameters["weight"] = bnb.nn.Params4bit.from_prequantized(
            data, stats, requires_grad=False, device=device, module=module
        )
        self._swap(module_name, module)
        self.num_quantized += 1

    def _swap(self, module_name: str, module: nn.Module) -> None:
        """Put the quantized layer where the nn.Linear was; its bias (loaded or still meta) moves over."""
        assert self.model is not None, "prepare() first"
        old = self.targets[module_name]
        if old.bias is not None:
            module._parameters["bias"] = old.bias
        parent_name, _, child = module_name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, module)
        self.targets[module_name] = module  # type: ignore[assignment]
