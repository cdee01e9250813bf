"""Synthetic chat workloads: OpenAI request bodies with generated images and prompts.

A workload is fully determined by `WorkloadSpec` (including its seed), so two runs send
byte-identical requests. Images are smooth random pictures (a coarse random colour grid
upsampled bicubically) encoded as JPEG data URLs: smooth content keeps the bodies small
while every unique image still has a distinct pixel hash on the server.

Fixed output length: with `ignore_eos` the body carries the extra fields `ignore_eos: true`
and `min_tokens: max_tokens` (accepted by our server and by vLLM), so every request
generates exactly `max_tokens` tokens. Servers that reject unknown fields need
`ignore_eos=False`; output lengths then vary and the report counts the real tokens.
"""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass

from PIL import Image

# Common one-token English words (one llama3 token each, with the leading space), so
# `prompt_tokens` words give roughly that many prompt tokens.
# fmt: off
_WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from",
    "this", "are", "or", "had", "not", "but", "what", "all", "were", "when", "we", "there", "can", "more",
    "if", "out", "so", "said", "up", "about", "into", "than", "them", "only", "other", "new", "some",
    "time", "two", "first", "then", "like", "now", "over", "such", "man", "even", "most", "made", "after",
    "also", "many", "before", "must", "through", "back", "years", "where", "much", "way", "well", "down",
    "people", "little", "state", "good", "very", "make", "world", "still", "own", "see", "work", "long",
    "day", "same", "another", "know", "while", "last", "great", "old", "year", "come", "right", "three",
)
# fmt: on

_QUESTIONS = (
    "Describe this image in detail.",
    "What is shown in the picture?",
    "List the colours you can see.",
    "Write a short story about this scene.",
)


@dataclass(frozen=True)
class WorkloadSpec:
    """What each synthetic request looks like."""

    model: str = "cogvlm2"
    image_size: int = 224
    """Side in pixels of the generated square images."""
    image_share: float = 1.0
    """Fraction of requests that carry an image (the rest are text-only)."""
    repeat_image_share: float = 0.0
    """Fraction of image requests that reuse one shared image (exercises the image cache)."""
    prompt_tokens: int = 32
    """Approximate prompt length in text tokens (one filler word per token), excluding the image."""
    max_tokens: int = 64
    ignore_eos: bool = True
    """Ask for exactly `max_tokens` output tokens (`ignore_eos` + `min_tokens` extra fields)."""
    stream: bool = True
    stream_share: float | None = None
    """If set, the fraction of requests that stream (overrides `stream`): mixed workloads."""
    temperature: float = 0.0
    seed: int = 0
    jpeg_quality: int = 85

    def validate(self) -> None:
        if self.image_size < 1:
            raise ValueError("image_size must be >= 1")
        for name in ("image_share", "repeat_image_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.stream_share is not None and not 0.0 <= self.stream_share <= 1.0:
            raise ValueError("stream_share must be in [0, 1]")
        if self.prompt_tokens < 0 or self.max_tokens < 1:
            raise ValueError("prompt_tokens must be >= 0 and max_tokens >= 1")


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: the JSON body plus what the report needs to know about it."""

    index: int
    body: dict
    is_stream: bool
    has_image: bool
    is_repeated_image: bool


def make_image_data_url(size: int, seed: int, quality: int = 85) -> str:
    """A smooth random RGB picture of `size` x `size` pixels as a JPEG data URL."""
    rng = random.Random(seed)
    coarse = Image.new("RGB", (4, 4))
    coarse.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(16)])
    image = coarse.resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def make_prompt(num_words: int, rng: random.Random) -> str:
    question = rng.choice(_QUESTIONS)
    filler = " ".join(rng.choice(_WORDS) for _ in range(num_words))
    return f"{filler} {question}".strip() if filler else question


def build_requests(spec: WorkloadSpec, num_requests: int) -> list[BenchRequest]:
    """`num_requests` request bodies, deterministic for a given spec.

    Exactly round(share * n) requests get each property (image, repeated image, stream),
    spread by a seeded shuffle, so counts in tests and reports are exact.
    """
    spec.validate()
    rng = random.Random(spec.seed)
    num_image = round(spec.image_share * num_requests)
    num_repeated = round(spec.repeat_image_share * num_image)
    stream_share = spec.stream_share if spec.stream_share is not None else (1.0 if spec.stream else 0.0)
    num_stream = round(stream_share * num_requests)

    has_image = _spread(num_image, num_requests, rng)
    is_stream = _spread(num_stream, num_requests, rng)
    image_slots = [i for i in range(num_requests) if has_image[i]]
    repeated = set(rng.sample(image_slots, num_repeated))

    shared_image = make_image_data_url(
        spec.image_size, seed=spec.seed * 1_000_003 + 7, quality=spec.jpeg_quality
    )
    requests = []
    for i in range(num_requests):
        content: list[dict] = [{"type": "text", "text": make_prompt(spec.prompt_tokens, rng)}]
        if has_image[i]:
            url = (
                shared_image
                if i in repeated
                else make_image_data_url(
                    spec.image_size, seed=spec.seed * 1_000_003 + 1000 + i, quality=spec.jpeg_quality
                )
            )
            content.append({"type": "image_url", "image_url": {"url": url}})
        body: dict = {
            "model": spec.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": spec.max_tokens,
            "temperature": spec.temperature,
            "stream": is_stream[i],
        }
        if is_stream[i]:
            body["stream_options"] = {"include_usage": True}
        if spec.ignore_eos:
            body["ignore_eos"] = True
            body["min_tokens"] = spec.max_tokens
        requests.append(
            BenchRequest(
                index=i,
                body=body,
                is_stream=is_stream[i],
                has_image=has_image[i],
                is_repeated_image=i in repeated,
            )
        )
    return requests


def _spread(count: int, total: int, rng: random.Random) -> list[bool]:
    flags = [True] * count + [False] * (total - count)
    rng.shuffle(flags)
    return flags
