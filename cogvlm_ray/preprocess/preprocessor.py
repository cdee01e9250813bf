"""Preprocessor: a `Conversation` (or OpenAI messages as plain dicts) -> PreparedPrompt, on CPU, without Ray.

The preprocessing Ray deployment is a thin wrapper around `Preprocessor.prepare`. The call is
synchronous and CPU-bound (and blocks on I/O when http(s) images are enabled), so an async
caller should run it in a thread (`asyncio.to_thread`). It is thread-safe: tokenisation and
the decoded-image cache are behind locks; image fetching and decoding run in parallel.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Any

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.contracts import PreparedPrompt, check_context_window
from cogvlm_ray.errors import ImageError, InvalidRequestError
from cogvlm_ray.preprocess.http_fetch import Resolver
from cogvlm_ray.preprocess.images import DecodedImage, content_hash, decode_image
from cogvlm_ray.preprocess.messages import Conversation, apply_conversation_rules, parse_messages
from cogvlm_ray.preprocess.options import PreprocessOptions
from cogvlm_ray.preprocess.prompt import build_prompt_ids, resolve_template
from cogvlm_ray.preprocess.sources import load_image_bytes

logger = logging.getLogger(__name__)


class Preprocessor:
    """Turns one chat request into the token ids and uint8 image the model replica needs."""

    def __init__(
        self,
        model_path_or_config: str | os.PathLike | ModelConfig,
        tokenizer: Any | None = None,
        options: PreprocessOptions | None = None,
        *,
        max_model_len: int | None = None,
        resolver: Resolver | None = None,
    ):
        """`tokenizer` defaults to the checkpoint's `PreTrainedTokenizerFast` (needs a path).
        `max_model_len` is the engine's (`EngineConfig.max_model_len`; default the checkpoint's
        context window), so the early context check refuses exactly what the engine would.
        `resolver` replaces DNS resolution for http(s) images (tests)."""
        if isinstance(model_path_or_config, ModelConfig):
            self.config = model_path_or_config
            if tokenizer is None:
                raise ValueError("a tokenizer is required when a ModelConfig is given instead of a path")
        else:
            self.config = ModelConfig.from_pretrained(model_path_or_config)
            if tokenizer is None:
                from transformers import PreTrainedTokenizerFast

                tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_path_or_config))
        self.tokenizer = tokenizer
        self.options = options or PreprocessOptions()
        self.max_model_len = max_model_len or self.config.max_context_len
        self._resolver = resolver
        self._cache: OrderedDict[str, DecodedImage] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._check_tokenizer()

    @property
    def image_size(self) -> int:
        return self.config.vision_config.image_size

    def prepare(
        self,
        conversation: Conversation | list[dict[str, Any]],
        *,
        max_tokens: int,
        template_version: str | None = None,
    ) -> PreparedPrompt:
        """Fetch/decode the image, build ids and check the context window.

        `conversation` comes parsed from the API (`api.chat.to_conversation`); plain message
        dicts are parsed here. Raises InvalidRequestError (bad messages/template/max_tokens),
        ImageError (image refused) or PromptTooLongError (prompt + max_tokens > max_model_len).
        """
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequestError(
                f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens"
            )
        prepared = self.tokenize(conversation, template_version=template_version)
        check_context_window(prepared.num_prompt_tokens, max_tokens, self.max_model_len)
        return prepared

    def tokenize(
        self, conversation: Conversation | list[dict[str, Any]], *, template_version: str | None = None
    ) -> PreparedPrompt:
        """`prepare` without the context-window check (what `POST /tokenize` reports)."""
        template = resolve_template(template_version, self.config)
        if not isinstance(conversation, Conversation):
            conversation = parse_messages(conversation)
        image = self._load_single_image(conversation.image_urls)
        query, history = apply_conversation_rules(
            conversation, has_image=image is not None, template_version=template
        )
        # HF fast tokenizers can raise "Already borrowed" when one instance is used from
        # several threads at once; tokenising a prompt takes well under a millisecond.
        with self._tokenizer_lock:
            input_ids, token_type_ids = build_prompt_ids(
                self.tokenizer,
                self.config,
                query=query,
                history=history,
                has_image=image is not None,
                template_version=template,
            )
        return PreparedPrompt(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            image=image.pixels if image is not None else None,
            image_hash=image.image_hash if image is not None else None,
        )

    def encode_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer's ids for a plain text (no template, no image)."""
        with self._tokenizer_lock:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int]) -> str:
        """Text of ids (special tokens kept, as vLLM's /detokenize); 400 for ids outside the vocabulary."""
        size = len(self.tokenizer)
        if any(not 0 <= t < size for t in token_ids):
            raise InvalidRequestError(f"token ids must be in [0, {size})", param="tokens")
        with self._tokenizer_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def load_image(self, url: str) -> DecodedImage:
        """Fetch and decode one image URL (cached by the encoded bytes' hash)."""
        return self._decode(load_image_bytes(url, self.options, resolver=self._resolver))

    def _load_single_image(self, urls: list[str]) -> DecodedImage | None:
        """One image per conversation: repeats of the same bytes are fine, different ones are not."""
        if not urls:
            return None
        blobs: dict[str, bytes] = {}
        for url in dict.fromkeys(urls):  # the same URL string is fetched once
            data = load_image_bytes(url, self.options, resolver=self._resolver)
            blobs.setdefault(content_hash(data, self.image_size), data)
        if len(blobs) > 1:
            raise ImageError(
                f"CogVLM2 accepts one image per conversation; this request has {len(blobs)} different "
                "images (repeating the same image in several turns is fine)",
                code="too_many_images",
            )
        ((digest, data),) = blobs.items()
        return self._decode(data, digest)

    def _decode(self, data: bytes, digest: str | None = None) -> DecodedImage:
        digest = digest or content_hash(data, self.image_size)
        with self._cache_lock:
            cached = self._cache.get(digest)
            if cached is not None:
                self._cache.move_to_end(digest)
                return cached
        decoded = decode_image(
            data,
            image_size=self.image_size,
            max_pixels=self.options.max_image_pixels,
            max_bytes=self.options.max_image_bytes,
            formats=self.options.image_formats,
            image_hash=digest,
        )
        if self.options.image_cache_size:
            with self._cache_lock:
                self._cache[digest] = decoded
                while len(self._cache) > self.options.image_cache_size:
                    self._cache.popitem(last=False)
        return decoded

    def _check_tokenizer(self) -> None:
        """The placeholder id comes from the config; make sure the tokenizer knows it."""
        placeholder = self.config.image_token_id
        if not 0 <= placeholder < len(self.tokenizer):
            raise ValueError(
                f"image placeholder id {placeholder} (config pad_token_id) is outside the tokenizer's "
                f"vocabulary of {len(self.tokenizer)}"
            )
        if self.tokenizer.bos_token_id is None:
            logger.warning(
                "tokenizer has no bos token; using config.bos_token_id=%d", self.config.bos_token_id
            )
