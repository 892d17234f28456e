"""The backend interface: small enough to read at a glance, with torch and onnxruntime behind it.

A backend turns already-tokenized items into raw Bradley–Terry rewards (logits, never a
sigmoid).  It knows nothing of HTTP, queues or references; the engine calls ``score`` from a
worker thread, one batch at a time.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..formatting import Encoded, Formatter


@dataclass(frozen=True)
class BackendInfo:
    kind: str  # "torch" | "onnx"
    device: str
    dtype: str
    max_length: int
    style: str
    revision: str
    path: str
    architecture: str  # "encoder" | "decoder"


class Backend(ABC):
    info: BackendInfo
    formatter: Formatter

    @abstractmethod
    def score(self, batch: Sequence[Encoded]) -> list[float]:
        """Raw rewards, one per item, in order.  May contain NaN: the engine checks."""

    def health(self) -> bool:
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    @property
    def on_gpu(self) -> bool:
        return self.info.device.startswith("cuda")


def pad_batch(
    batch: Sequence[Encoded], pad_id: int, with_types: bool, length: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Right-pad to the longest item (or to ``length``): (input_ids, attention_mask,
    token_type_ids), each (B, T) int64."""
    longest = max([len(e) for e in batch] + ([length] if length else []))
    ids = np.full((len(batch), longest), pad_id, dtype=np.int64)  # (B, T)
    mask = np.zeros((len(batch), longest), dtype=np.int64)  # (B, T)
    types = np.zeros((len(batch), longest), dtype=np.int64) if with_types else None  # (B, T)
    for i, e in enumerate(batch):
        n = len(e)
        ids[i, :n] = e.input_ids
        mask[i, :n] = 1
        if types is not None and e.token_type_ids is not None:
            types[i, :n] = e.token_type_ids
    return ids, mask, types


WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".bin", ".json", ".gguf")


def revision_of(path: str | Path) -> str:
    """A short content fingerprint of a model directory's weight and config files.

    Big files are fingerprinted by size and their first and last MiB, so start-up stays fast.
    """
    root = Path(path)
    if not root.is_dir():
        return "hub:" + str(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root)}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()[:12]
