"""PyTorch backend: any one-label ``AutoModelForSequenceClassification``, encoder or decoder.

Decoders reuse the prompt: items of a batch that start with the same prompt tokens (best-of-k:
one prompt, many responses) share one forward pass over the prompt, whose KV cache then serves
every response.  Causal attention makes this exact: a prefix's hidden states do not depend on
what follows it.  ``reuse_prefix=False`` switches it off (the bench measures both).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections import defaultdict
from typing import Any, Sequence

import torch

from ..formatting import Encoded
from .base import Backend, BackendInfo, pad_batch, revision_of
from .modeling import DTYPES, LoadedModel, is_decoder, make_formatter, reward_forward, unwrap

# A shared prefix shorter than this is not worth a separate forward pass.
MIN_PREFIX = 16
# Rows of one prefix group per suffix pass: bounds the copied KV cache (rows × prefix × layers).
MAX_GROUP_ROWS = 32


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to do
        return None


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS.  Batches of ever-different shapes otherwise leave
    glibc's heap fragmented and the process grows by hundreds of MiB over thousands of requests
    (measured by ``logand bench --soak``); trimming after a batch costs well under a millisecond."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def bound_onednn_cache() -> None:
    """oneDNN (bf16 on CPU) keeps compiled kernels per input shape, 1024 of them by default, and
    varied batch shapes fill that with hundreds of MiB.  64 keeps it small at no measured cost.
    Read by oneDNN when it first runs, so this is set before the model's first forward."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")


class TorchBackend(Backend):
    def __init__(self, loaded: LoadedModel, dtype: str, device: str, reuse_prefix: bool = True,
                 **format_overrides: object) -> None:
        self.loaded = loaded
        self.device = torch.device(device)
        self.formatter = make_formatter(loaded, **format_overrides)  # type: ignore[arg-type]
        self._types = loaded.uses_token_types()
        self._decoder = is_decoder(loaded.model)
        self.reuse_prefix = reuse_prefix and self._decoder
        tok = loaded.tokenizer
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.info = BackendInfo(
            kind="torch", device=device, dtype=dtype, max_length=self.formatter.max_length,
            style=self.formatter.style, revision=revision_of(loaded.path), path=loaded.path,
            architecture=loaded.architecture,
        )
        assert DTYPES[dtype] == next(loaded.model.parameters()).dtype

    def score(self, batch: Sequence[Encoded]) -> list[float]:
        try:
            return self._score(batch)
        finally:
            if self.device.type == "cpu":
                release_freed_memory()

    def _score(self, batch: Sequence[Encoded]) -> list[float]:
        if not self.reuse_prefix or len(batch) < 2:
            return self._score_plain(batch)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, e in enumerate(batch):
            n = min(e.prefix_len, len(e) - 1)  # every item keeps at least one token to pool at
            key = tuple(e.input_ids[:n]) if n >= MIN_PREFIX else ()
            groups[key].append(i)
        out: list[float] = [0.0] * len(batch)
        singles = [i for key, idx in groups.items() if not key or len(idx) < 2 for i in idx]
        if len(singles) == len(batch):
            return self._score_plain(batch)
        if singles:
            for i, s in zip(singles, self._score_plain([batch[i] for i in singles])):
                out[i] = s
        for key, idx in groups.items():
            if key and len(idx) >= 2:
                for i, s in zip(idx, self._score_shared_prefix(key, [batch[i] for i in idx])):
                    out[i] = s
        return out

    def _score_plain(self, batch: Sequence[Encoded]) -> list[float]:
        ids, mask, types = pad_batch(batch, self._pad, self._types)
        with torch.inference_mode():
            t_ids = torch.from_numpy(ids).to(self.device)
            t_mask = torch.from_numpy(mask).to(self.device)
            t_types = torch.from_numpy(types).to(self.device) if types is not None else None
            rewards = reward_forward(self.loaded.model, t_ids, t_mask, t_types)  # (B,)
        return rewards.float().cpu().tolist()

    def _score_shared_prefix(self, prefix: tuple[int, ...], items: Sequence[Encoded]) -> list[float]:
        """One pass over the shared prefix, then the suffixes against its KV cache."""
        from transformers import DynamicCache

        inner: Any = unwrap(self.loaded.model)
        n = len(prefix)
        rewards: list[float] = []
        with torch.inference_mode():
            head = torch.tensor([prefix], device=self.device)  # (1, P)
            cache = inner.base_model(input_ids=head, attention_mask=torch.ones_like(head), use_cache=True).cache
            kv = [(layer.keys, layer.values) for layer in cache.layers]  # each (1, heads, P, d)
            for start in range(0, len(items), MAX_GROUP_ROWS):
                chunk = items[start:start + MAX_GROUP_ROWS]
                g = len(chunk)
                suffix = [e.input_ids[n:] for e in chunk]
                longest = max(len(s) for s in suffix)
                ids = torch.full((g, longest), self._pad, dtype=torch.long)  # (G, S)
                mask = torch.zeros((g, n + longest), dtype=torch.long)  # (G, P + S)
                mask[:, :n] = 1
                for r, s in enumerate(suffix):
                    ids[r, : len(s)] = torch.tensor(s)
                    mask[r, n : n + len(s)] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                # The model appends to the cache, so each chunk gets its own (expanded) copy.
                past = DynamicCache(ddp_cache_data=[(k.expand(g, -1, -1, -1), v.expand(g, -1, -1, -1)) for k, v in kv],
                                    config=inner.config)
                hidden = inner.base_model(input_ids=ids, attention_mask=mask, cache=past,
                                          use_cache=True)[0]  # (G, S, H)
                last = torch.tensor([len(s) - 1 for s in suffix], device=self.device)  # (G,)
                pooled = hidden[torch.arange(g, device=self.device), last]  # (G, H)
                rewards.extend(inner.score(pooled)[:, 0].float().cpu().tolist())
        return rewards

    def close(self) -> None:
        del self.loaded
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
