"""Model backends behind one small interface (:class:`Backend`): torch and onnxruntime."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from .base import Backend, BackendInfo, pad_batch

log = logging.getLogger(__name__)

__all__ = ["Backend", "BackendInfo", "load_backend", "pad_batch"]


def load_backend(cfg: ModelConfig, base_dir: Path | None, threads: int | None = None) -> Backend:
    """Build the backend a model's config asks for.  Raises ModelLoadError naming the model."""
    from ..modelpath import resolve_model_path
    from .modeling import ModelLoadError, cpu_has_native_bf16, resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    overrides: dict[str, Any] = dict(style=cfg.style, max_length=cfg.max_length,
                                     chat_template=cfg.chat_template, append_eos=cfg.append_eos)
    try:
        if cfg.backend == "onnx":
            from .onnx_backend import OnnxBackend

            return OnnxBackend(resolve_model_path(cfg.path, base_dir), device=device, threads=threads,
                               quantize=cfg.quantize, **overrides)
        from .modeling import load_reward_model
        from .torch_backend import TorchBackend, bound_onednn_cache

        if device == "cpu":
            bound_onednn_cache()

        dtype = resolve_dtype(cfg.dtype, device)
        if device == "cpu" and dtype in ("bfloat16", "float16") and not cpu_has_native_bf16():
            log.warning("model %r: %s on a CPU without native bf16 (AVX-512 BF16 or AMX): torch emulates its "
                        "matmuls, which runs tens of times slower than float32 here; set dtype: float32",
                        cfg.name, dtype)
        loaded = load_reward_model(cfg.path, dtype, device, base_dir, cfg.trust_remote_code)
        if cfg.quantize != "none":
            raise ModelLoadError("quantize is an onnx-backend option (export with 'logand export-onnx')")
        return TorchBackend(loaded, dtype, device, reuse_prefix=cfg.reuse_prefix, **overrides)
    except ModelLoadError as exc:
        raise ModelLoadError(f"model {cfg.name!r}: {exc}") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"model {cfg.name!r}: {type(exc).__name__}: {exc}") from exc
