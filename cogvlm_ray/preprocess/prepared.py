"""PreparedPrompt: the one object that crosses from the preprocessing replica to the model replica.

It is deliberately small and cheap to ship through Ray's object store: token ids as lists,
the image as a uint8 numpy array [3, S, S] (numpy, not torch: Ray moves numpy arrays through
shared memory zero-copy, torch tensors are pickled and copied, see docs), and a content hash
so the model replica's image-feature cache can skip the vision tower.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PreparedPrompt:
    input_ids: list[int]
    """Full prompt: [bos] + [placeholder] * num_image_tokens + text ids."""
    token_type_ids: list[int]
    """0 = language, 1 = vision (boi, patches, eoi), same length as input_ids."""
    image: np.ndarray | None
    """Resized RGB image, uint8 [3, S, S] (channels first), not normalised; None for text-only."""
    image_hash: str | None
    """Content hash, the image-cache key; None for text-only. The preprocessor uses
    `images.content_hash` (encoded bytes + target size: equal hashes mean equal pixels, and it
    is cheaper than hashing 5.4 MB of pixels); `images.pixel_hash` hashes an array directly."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def has_image(self) -> bool:
        return self.image is not None
