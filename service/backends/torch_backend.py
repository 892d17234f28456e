"""PyTorch backend: any one-label ``AutoModelForSequenceClassification``, encoder or decoder."""

from __future__ import annotations

from typing import Sequence

import torch

from ..formatting import Encoded
from .base import Backend, BackendInfo, pad_batch, revision_of
from .modeling import DTYPES, LoadedModel, make_formatter, reward_forward


class TorchBackend(Backend):
    def __init__(self, loaded: LoadedModel, dtype: str, device: str, **format_overrides: object) -> None:
        self.loaded = loaded
        self.device = torch.device(device)
        self.formatter = make_formatter(loaded, **format_overrides)  # type: ignore[arg-type]
        self._types = loaded.uses_token_types()
        tok = loaded.tokenizer
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.info = BackendInfo(
            kind="torch", device=device, dtype=dtype, max_length=self.formatter.max_length,
            style=self.formatter.style, revision=revision_of(loaded.path), path=loaded.path,
            architecture=loaded.architecture,
        )
        assert DTYPES[dtype] == next(loaded.model.parameters()).dtype

    def score(self, batch: Sequence[Encoded]) -> list[float]:
        ids, mask, types = pad_batch(batch, self._pad, self._types)
        with torch.inference_mode():
            t_ids = torch.from_numpy(ids).to(self.device)
            t_mask = torch.from_numpy(mask).to(self.device)
            t_types = torch.from_numpy(types).to(self.device) if types is not None else None
            rewards = reward_forward(self.loaded.model, t_ids, t_mask, t_types)  # (B,)
        return rewards.float().cpu().tolist()

    def close(self) -> None:
        del self.loaded
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
