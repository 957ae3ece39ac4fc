"""Prompt embeddings cached: a pipeline's `encode_prompt` (T5, umT5, CLIP text encoders) and, for image-to-video,
`encode_image` (the CLIP vision encoder) answered from the cache for an input seen before, so the encoders do not
run, and can stay parked.

Keys: the pipeline class, the content fingerprint of every text encoder (or the image encoder) and a digest of
every tokenizer's vocabulary, and every argument but the device: prompts, negative prompts, sequence length,
guidance, count, dtype. Prompts that differ by one token differ in the key. A call given precomputed embeddings
(`prompt_embeds=...`) goes to the pipeline's own method."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ... import TierCache
from ...errors import EntryValueError
from .fingerprint import content_hash, fingerprint

COUNT = "outputs"  # the entry's tensor holding how many values the method returned (the others may be None)


def _plain(value: Any) -> Any:
    """A stable, comparable form of an argument for the key (tensors by content, dtypes by name)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", content_hash(value))
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _plain(v)) for k, v in value.items()))
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, hashlib.blake2b(value.tobytes(), digest_size=8).hexdigest())
    if hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        return ("image", value.mode, value.size, hashlib.blake2b(value.tobytes(), digest_size=8).hexdigest())
    if value is None or isinstance(value, (str, int, float, bool, torch.dtype)):
        return value if not isinstance(value, torch.dtype) else str(value)
    raise EntryValueError(
        f"cache_prompts: cannot key an argument of type {type(value).__name__}; pass tensors, images, strings or "
        "numbers, or call the pipeline's method without the cache"
    )


def _vocabulary(tokenizer: Any) -> str:
    """A digest of a tokenizer: its class, length limit and every (token, id) of its vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{type(tokenizer).__qualname__}|{getattr(tokenizer, 'model_max_length', None)}|".encode())
    for token, index in vocab:
        h.update(f"{token}\0{index}\0".encode())
    return h.hexdigest()


class _Cached:
    """One pipeline method answered from the cache."""

    def __init__(self, owner: PromptCache, method: str, encoders: list[str], tokenizers: list[str]) -> None:
        self.owner = owner
        self.method = method
        self.encoders = encoders
        self.tokenizers = tokenizers
        pipe = owner.pipe
        self.had_own = method in pipe.__dict__
        self.original: Callable[..., Any] = getattr(pipe, method)
        self.signature = inspect.signature(self.original)
        self._vocab: dict[int, tuple[Any, str]] = {}  # id(tokenizer) -> (tokenizer, digest): taken once each
        setattr(pipe, method, self)

    def _tokenizer_digest(self, tokenizer: Any) -> str:
        known = self._vocab.get(id(tokenizer))
        if known is None or known[0] is not tokenizer:
            known = self._vocab[id(tokenizer)] = (tokenizer, _vocabulary(tokenizer))
        return known[1]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        given = [n for n, v in arguments.items() if n.endswith("_embeds") and v is not None]
        if given:  # the caller has the embeddings already: nothing to encode, nothing to key
            return self.original(*args, **kwargs)
        pipe = self.owner.pipe
        device = arguments.pop("device", None) or pipe._execution_device
        parts = [type(pipe).__qualname__, self.method]
        parts += [f"{n}={fingerprint(getattr(pipe, n))}" for n in self.encoders if getattr(pipe, n, None) is not None]
        parts += [f"{n}={self._tokenizer_digest(getattr(pipe, n))}" for n in self.tokenizers if getattr(pipe, n, None)]
        parts.append(repr(sorted((n, _plain(v)) for n, v in arguments.items())))
        key = f"{self.owner.prefix}{hashlib.blake2b('|'.join(parts).encode(), digest_size=12).hexdigest()}"
        cache = self.owner.cache
        stored = cache.get(key, device=device)
        if stored is not None:
            self.owner.hits += 1
            count = int(stored[COUNT].item())
            values = [stored.get(f"{i}") for i in range(count)]
            return values[0] if count == 1 and "single" in stored else tuple(values)
        self.owner.misses += 1
        result = self.original(*args, **kwargs)
        values = [result] if isinstance(result, torch.Tensor) else list(result)
        if all(v is None or isinstance(v, torch.Tensor) for v in values):
            entry = {f"{i}": v for i, v in enumerate(values) if v is not None}
            entry[COUNT] = torch.tensor(len(values))
            if isinstance(result, torch.Tensor):
                entry["single"] = torch.tensor(1)
            cache.put(key, entry, write_through=self.owner.write_through)
        return result

    def remove(self) -> None:
        pipe = self.owner.pipe
        if self.had_own:
            setattr(pipe, self.method, self.original)
        else:
            pipe.__dict__.pop(self.method, None)


class PromptCache:
    """The cached encoders of one pipeline (`cache_prompts`); `remove()` restores its methods. `hits` and
    `misses` count calls served from the cache and calls that ran the encoders."""

    def __init__(self, pipe: Any, cache: TierCache, *, prefix: str, write_through: bool | None) -> None:
        self.pipe = pipe
        self.cache = cache
        self.prefix = prefix
        self.write_through = write_through
        self.hits = 0
        self.misses = 0
        names = list(getattr(pipe, "components", {}))
        self._methods: list[_Cached] = []
        if callable(getattr(pipe, "encode_prompt", None)):
            encoders = [n for n in names if n.startswith("text_encoder")]
            tokenizers = [n for n in names if n.startswith("tokenizer")]
            self._methods.append(_Cached(self, "encode_prompt", encoders, tokenizers))
        if callable(getattr(pipe, "encode_image", None)) and getattr(pipe, "image_encoder", None) is not None:
            self._methods.append(_Cached(self, "encode_image", ["image_encoder"], []))
        if not self._methods:
            raise EntryValueError(f"cache_prompts: {type(pipe).__name__} has no encode_prompt or encode_image")

    def remove(self) -> None:
        for method in self._methods:
            method.remove()
        self._methods.clear()


def cache_prompts(
    pipe: Any, cache: TierCache, *, prefix: str = "prompts/", write_through: bool | None = None
) -> PromptCache:
    """Answer `pipe.encode_prompt` (and `pipe.encode_image`, where the pipeline has an image encoder) from `cache`
    for inputs seen before, in this process or another on the same root; `remove()` undoes it."""
    return PromptCache(pipe, cache, prefix=prefix, write_through=write_through)
