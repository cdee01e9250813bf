"""Batched logit transforms: each takes logits [B, V] and per-row tensors, one op over the batch.

Pure tensor functions with no host syncs (no `.item()`, `.tolist()`, `nonzero()` or tensor
truth tests), so a step's sampling can run on a GPU without waiting for it. Row parameters
arrive as device tensors of shape [B] (or [B, 1] after `[:, None]`); a row whose parameter is
neutral (top_k 0, top_p 1, min_p 0, penalty 1 / 0) comes out unchanged. `engine/sampler.py`
decides which transforms a step needs and in which order.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def apply_penalties(
    logits: torch.Tensor,
    seen_ids: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalty: torch.Tensor | None,
    frequency_penalty: torch.Tensor | None,
    presence_penalty: torch.Tensor | None,
) -> torch.Tensor:
    """Repetition (HF) then frequency / presence (OpenAI) penalties on [N, V] logits.

    seen_ids: int64 [N, L], every prompt and output id of the row (repeats allowed);
    output_counts: int [N, V], how often each token was generated so far; penalties float [N],
    None when no row uses that kind. Repetition penalty (HF rule) applies to every token seen
    in the prompt or the output: positive logits are divided by it, negative ones multiplied
    (gathered and scattered at `seen_ids`: a repeated id writes the same value twice).
    OpenAI's penalties apply to generated tokens only: `logit - frequency * count - presence * (count > 0)`.
    """
    if repetition_penalty is not None:
        rp = repetition_penalty[:, None]
        seen = logits.gather(-1, seen_ids)
        logits = logits.scatter(-1, seen_ids, torch.where(seen > 0, seen / rp, seen * rp))
    if frequency_penalty is not None:
        logits = logits - frequency_penalty[:, None] * output_counts.to(logits.dtype)
    if presence_penalty is not None:
        logits = logits - presence_penalty[:, None] * (output_counts > 0).to(logits.dtype)
    return logits


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    """Mask the tokens a grammar forbids, in place; returns `logits`. Same result as xgrammar's
    `apply_token_bitmask_inplace(logits, bitmask, indices=row_index)`.

    bitmask: int32 [B, ceil(V / 32)] in xgrammar's layout (row b belongs to logits row b; bit j
    of word w allows token 32 * w + j; 1 = allowed), on any device; row_index: int64 [N], the
    constrained rows. Other rows are untouched, so unconstrained requests pay nothing beyond
    this one op.
    """
    vocab = logits.shape[-1]
    words = bitmask.to(logits.device, non_blocking=True)[row_index]  # [N, W]
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((words[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :vocab]  # [N, W * 32] -> [N, V]
    logits[row_index] = logits[row_index].masked_fill_(~allowed, NEG_INF)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below `min_p` times the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, NEG_INF)


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    max_top_k: int | None = None,
) -> torch.Tensor:
    """Keep each row's top-k logits and then its top-p nucleus (the most likely token always stays).

    top_k: int64 [N], values in [1, V] (V keeps everything); `max_top_k` (host int) is the
    largest k below V, so one `topk` finds every row's k-th value; top_p: float [N] in (0, 1].
    The top-p sort runs on the top-k-masked logits, as HF does, which is also what makes it
    cheap for top-k rows (a row that is mostly -inf sorts fast). The masks equal HF's
    `TopKLogitsWarper` / `TopPLogitsWarper` row by row (ties at the k-th value are kept).
    """
    vocab = logits.shape[-1]
    if top_k is not None:
        num_top = min(max_top_k or vocab, vocab)
        values = logits.topk(num_top, dim=-1).values  # [N, num_top], descending
        kth = values.gather(-1, (top_k.clamp(max=num_top) - 1)[:, None])  # [N, 1]: the k-th largest
        kth = kth.masked_fill((top_k >= vocab)[:, None], NEG_INF)  # rows without top-k keep all
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p is not None:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = (cumulative <= (1.0 - top_p)[:, None]) & (top_p < 1.0)[:, None]
        remove[:, -1] = False  # keep the most likely token
        logits = torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits.masked_fill(remove, NEG_INF))
    return logits


def draw(
    probs: torch.Tensor,
    generators: list[tuple[int, torch.Generator]],
    shared_generator: torch.Generator | None,
    num_shared: int,
) -> torch.Tensor:
    """One id per row of probs [N, V], as `torch.multinomial(probs, 1)` draws it, without its sync.

    torch's single-sample multinomial is argmax(p / q) with q ~ Exp(1) (after an `.item()`
    validity check, the host sync this avoids). The first `num_shared` rows share one draw
    from `shared_generator`; each row listed in `generators` (row, generator) draws its q from
    its own generator, so a seeded row gets exactly the token
    `torch.multinomial(probs[row], 1, generator=g)` gives, whatever else is in the batch.
    """
    q = torch.empty_like(probs)
    if num_shared:
        q[:num_shared].exponential_(generator=shared_generator)
    for row, generator in generators:
        q[row].exponential_(generator=generator)
    return (probs / q).argmax(dim=-1)


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax of logits [N, V]: the chosen ids' logprobs [N], and the top `num_top` (values, ids)."""
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(-1, token_ids[:, None])[:, 0]
    if num_top == 0:
        return chosen, logprobs[:, :0], token_ids[:, None][:, :0]
    top_values, top_ids = logprobs.topk(num_top, dim=-1)
    return chosen, top_values, top_ids
