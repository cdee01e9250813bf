"""CogVLM2 token layout rules: rotary position ids and visual-expert routing.

Pure functions on `token_type_ids` (0 = language, 1 = vision: boi, patches, eoi), used by the
model's Hugging Face forward and by the engine when it builds a step. They own nothing else:
splicing image rows into the embeddings happens in `cogvlm.py`.
"""

from __future__ import annotations

import torch

from cogvlm_ray.contracts import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE


def build_position_ids(
    token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotary positions per the official CogVLM2 rule, for `[L]` or `[B, L]`.

    Masked positions (attention_mask == 0) count as neither type and repeat the previous
    position. Inside a run of vision tokens, the first and last (boi, eoi) count as language.
    The position advances at every language token and at the first patch after a language
    token, so one image costs 3 steps: bos 0, boi 1, all patches 2, eoi 3, text 4, ...

    The first real token of a row gets position 0 even after left padding (the official
    code would start a left-padded row at 1); for unpadded and right-padded rows the result
    equals the official function exactly.
    """
    squeeze = token_type_ids.dim() == 1
    types = token_type_ids.unsqueeze(0) if squeeze else token_type_ids
    types = types.to(torch.long).clone()
    if attention_mask is not None:
        mask = (attention_mask.unsqueeze(0) if squeeze else attention_mask).to(types.device).bool()
        types[~mask] = -1  # neither language nor vision
    is_vision = types == VISION_TOKEN_TYPE
    is_language = types == LANGUAGE_TOKEN_TYPE
    # boi / eoi: vision tokens whose left / right neighbour is language (or the row edge).
    is_boundary = torch.zeros_like(is_vision)
    is_boundary[:, 1:] |= is_vision[:, 1:] & is_language[:, :-1]
    is_boundary[:, :1] |= is_vision[:, :1]
    is_boundary[:, :-1] |= is_vision[:, :-1] & is_language[:, 1:]
    is_boundary[:, -1:] |= is_vision[:, -1:]
    language_like = is_language | is_boundary
    patch = is_vision & ~is_boundary
    step = language_like.clone()
    step[:, 1:] |= patch[:, 1:] & language_like[:, :-1]
    positions = (step.to(torch.long).cumsum(dim=-1) - 1).clamp_(min=0)
    return positions.squeeze(0) if squeeze else positions


def build_vision_expert_mask(token_type_ids: torch.Tensor) -> torch.Tensor:
    """True where a token uses the visual expert: type[i] == 1 and type[i + 1] == 1.

    boi and the patches route to the vision expert, eoi (followed by text) and the last
    position of the sequence to the language expert. Works on `[L]` or `[B, L]`. Callers
    that process a prompt in chunks must compute this on the whole prompt and slice it.
    """
    is_vision = token_type_ids == VISION_TOKEN_TYPE
    mask = torch.zeros_like(is_vision)
    mask[..., :-1] = is_vision[..., :-1] & is_vision[..., 1:]
    return mask
