"""Per-step engine statistics, as a plain dataclass (Prometheus lives in serve/metrics.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    num_waiting_for_kv: int = 0
    """Waiting requests that could not be admitted because the KV cache is full."""
    batch_size: int = 0
    """Sequences in the last step."""
    num_prefill_tokens: int = 0
    """Prompt tokens computed in the last step."""
    num_decode_tokens: int = 0
    """Tokens decoded in the last step."""
    kv_cache_usage: float = 0.0
    """Fraction of KV blocks in use, 0..1."""
    image_cache_hits: int = 0
    """Cumulative."""
    image_cache_queries: int = 0
    """Cumulative."""
    image_cache_bytes: int = 0
    prefix_cache_hit_tokens: int = 0
    """Cumulative prompt tokens whose KV was reused from the prefix cache (not recomputed)."""
    total_prompt_tokens: int = 0
    """Cumulative."""
    total_generated_tokens: int = 0
    """Cumulative."""
    num_steps: int = 0
    """Cumulative."""
    is_alive: bool = True
