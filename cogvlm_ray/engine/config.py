"""EngineConfig: the knobs of the continuous-batching engine (scheduling, KV budget, caches).

A frozen dataclass built by the serving layer from its pydantic args; the engine validates it
once at construction. Model facts (context window, eos ids) come from the model, not from here.
"""

from __future__ import annotations

from dataclasses import dataclass

#: `EngineConfig.attention_backend` values: "auto" resolves per device (`resolve_attention_backend`).
ATTENTION_BACKEND_CHOICES = ("auto", "sdpa", "triton", "reference")


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 32
    """Running sequences per step (= Serve max_ongoing_requests)."""
    max_num_batched_tokens: int = 4096
    """Per-step token budget: prefill chunks + one token per decoding sequence."""
    block_size: int = 16
    """Tokens per KV block (paged cache)."""
    num_kv_blocks: int | None = None
    """Explicit KV cache size in blocks (wins over the two options below)."""
    kv_cache_memory_fraction: float = 0.85
    """GPU: fraction of the device memory still free after the weights are loaded."""
    max_kv_tokens: int | None = None
    """Explicit KV cache size in tokens; on CPU the default is `DEFAULT_CPU_KV_TOKENS`."""
    image_cache_bytes: int = 1 << 30
    """Byte budget of the image-feature LRU (0 disables caching)."""
    max_waiting: int = 256
    """Engine-side queue bound: add_request raises OverloadedError beyond it."""
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    """Reuse the K/V of full prompt blocks already computed for the same prefix (same image + text)."""
    max_model_len: int | None = None
    """Prompt + output limit per sequence; default: the model's context window (8192)."""
    max_n: int = 8
    """Most choices one request may ask for (SamplingParams.n)."""
    attention_backend: str = "auto"
    """"auto" (Triton kernels on CUDA when triton imports, SDPA elsewhere), "sdpa", "triton"
    (CUDA, or CPU under TRITON_INTERPRET=1 for tests) or "reference" (plain torch)."""
    enforce_eager: bool = False
    """Run decode steps eagerly; otherwise, on CUDA with a graph-safe attention backend, they
    replay CUDA graphs captured at start for padded batch sizes (`cuda_graphs.py`)."""
    max_images_per_step: int = 2
    """Encoder budget: prompts whose chunk needs the vision tower (image-feature cache misses)
    admitted per step, so one step never stalls every stream on many images."""
    max_cached_grammars: int = 64
    """Structured output: compiled grammars kept (LRU), one per distinct schema / regex / choice."""
    grammar_compile_timeout_s: float = 10.0
    """A request whose grammar takes longer to compile gets a 400 (the compile finishes off-loop)."""
    max_grammar_spec_chars: int = 64 * 1024
    """Largest schema / regex / choice list accepted (characters of its canonical JSON text)."""
    max_grammar_bytes: int = 64 << 20
    """Largest compiled grammar accepted (bytes)."""

    def validate(self) -> None:
        """Raise ValueError for settings the engine cannot run with."""
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (one decode token each)")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.max_kv_tokens is not None and self.max_kv_tokens < self.block_size:
            raise ValueError("max_kv_tokens must be >= block_size")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1]")
        if self.image_cache_bytes < 0:
            raise ValueError("image_cache_bytes must be >= 0")
        if self.max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.max_n < 1:
            raise ValueError("max_n must be >= 1")
        if self.max_images_per_step < 1:
            raise ValueError("max_images_per_step must be >= 1")
        if self.attention_backend not in ATTENTION_BACKEND_CHOICES:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKEND_CHOICES}, got {self.attention_backend!r}"
            )

        if self.max_cached_grammars < 1:
            raise ValueError("max_cached_grammars must be >= 1")
        if self.grammar_compile_timeout_s <= 0:
            raise ValueError("grammar_compile_timeout_s must be > 0")


def resolve_attention_backend(name: str, device_type: str) -> str:
    """The `ATTENTION_BACKENDS` name to run for `EngineConfig.attention_backend` on `device_type`.

    Raises ValueError when "triton" is asked for where its kernels cannot run.
    """
    import torch

    from cogvlm_ray.model.kernels import can_run_on, triton_importable

    if name == "auto":
        return "triton" if device_type == "cuda" and triton_importable() else "sdpa"
    if name == "triton":
        ok, why = can_run_on(torch.device(device_type))
        if not ok:
            raise ValueError(f"attention_backend 'triton' cannot run here: {why}")
    return name


#: KV size used on CPU when neither num_kv_blocks nor max_kv_tokens is given.
DEFAULT_CPU_KV_TOKENS = 65536
