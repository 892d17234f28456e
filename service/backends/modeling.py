"""Loading reward-model directories and computing rewards with torch.

Shared by the torch backend, the ONNX exporter and the trainer, so a model scores the same
wherever it runs.  A reward-model directory is one of:

* a plain Hugging Face ``AutoModelForSequenceClassification`` directory with one label;
* a PEFT adapter directory (``adapter_config.json``), merged into its backbone at load time;
  the backbone comes from ``logand.json``'s ``backbone`` or the adapter's base model name,
  and may be ``pkg:…`` (a directory inside an installed package).

``logand.json`` (the card written by ``logand train-rm``) is optional; when present it supplies
the formatting the model was trained with (style, max_length, append_eos).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..formatting import Formatter
from ..modelpath import resolve_model_path

log = logging.getLogger(__name__)

CARD_NAME = "logand.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model that cannot be served; the message names it and says why."""


def read_card(path: str | Path) -> dict[str, Any] | None:
    card = Path(path) / CARD_NAME
    if not card.is_file():
        return None
    try:
        return json.loads(card.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{card}: unreadable model card ({exc})") from exc


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX).  Without it, torch
    emulates bf16 matmuls: on an AVX2-only EPYC they ran at ~1 GFLOP/s against ~60 in fp32."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probes):
        return any(_answers_yes(p) for p in probes if p is not None)
    try:  # older torch: the kernel's own flags
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _answers_yes(probe: Any) -> bool:
    try:
        return bool(probe())
    except RuntimeError:
        return False


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto``: bf16 on CUDA where supported; float32 on CPU (bf16 is opt-in there)."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def is_decoder_config(config: Any) -> bool:
    """Decoder-only (reward read at the last token) or encoder (reward read from [CLS])."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{config.model_type}: encoder-decoder models are not supported as reward models")
    kind = config.model_type
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # BERT also has a causal-LM head class
        return False
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    archs = getattr(config, "architectures", None) or []
    return bool(getattr(config, "is_decoder", False)) or any("CausalLM" in a or "LMHead" in a for a in archs)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers stay in place)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def is_decoder(model: nn.Module) -> bool:
    return is_decoder_config(unwrap(model).config)


def reward_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw rewards (B,) for right-padded inputs (B, T); plain models and peft wrappers alike.

    Encoders use their classification head as is.  Decoders are pooled here, at the last real
    token found from the attention mask, rather than through ``pad_token_id`` as transformers
    does: that breaks when pad == EOS and the response ends in EOS.  The dtype follows any
    active autocast.
    """
    inner: Any = unwrap(model)
    if not is_decoder_config(inner.config):
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits[:, 0]  # (B,)
    hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]  # (B, T, H)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
    last = (attention_mask.to(positions.dtype) * positions).argmax(-1)  # (B,) last real token
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    return inner.score(pooled)[:, 0]  # (B,)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    card: dict[str, Any] | None
    path: str  # the resolved directory (or hub name)

    @property
    def architecture(self) -> str:
        return "decoder" if is_decoder(self.model) else "encoder"

    def uses_token_types(self) -> bool:
        """As trained (the card records it); else whenever the encoder has segment embeddings."""
        if self.card is not None and "token_type_ids" in self.card:
            return bool(self.card["token_type_ids"])
        return uses_token_types(self.model)


def uses_token_types(model: nn.Module) -> bool:
    return getattr(model.config, "type_vocab_size", 0) > 1 and not is_decoder(model)


def _from_pretrained(path: str, dtype: torch.dtype, trust_remote_code: bool, **kwargs: Any) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
    )


def load_reward_model(
    ref: str | Path,
    dtype: str = "float32",
    device: str = "cpu",
    base_dir: Path | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a reward-model directory (plain or adapter) in eval mode on ``device``."""
    from transformers import AutoTokenizer

    try:
        path = resolve_model_path(ref, base_dir)
        card = read_card(path) if Path(path).is_dir() else None
        torch_dtype = DTYPES[dtype]
        adapter = Path(path, "adapter_config.json")
        if adapter.is_file():
            from peft import PeftModel

            backbone = (card or {}).get("backbone") or json.loads(adapter.read_text())["base_model_name_or_path"]
            # The backbone is a bare encoder/decoder: give it the one-label head the adapter fills.
            base = _from_pretrained(resolve_model_path(backbone), torch.float32, trust_remote_code, num_labels=1)
            model = PeftModel.from_pretrained(base, path).merge_and_unload()
            model = model.to(torch_dtype)
        else:
            model = _from_pretrained(path, torch_dtype, trust_remote_code)
        tok_path = path if Path(path, "tokenizer_config.json").is_file() or not Path(path).is_dir() else None
        if tok_path is None:
            backbone = (card or {}).get("backbone")
            if not backbone:
                raise ModelLoadError(f"{path}: no tokenizer files and no backbone to take them from")
            tok_path = resolve_model_path(backbone)
        tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=trust_remote_code)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers/peft raise many kinds; all mean "cannot serve this"
        raise ModelLoadError(f"cannot load reward model {ref}: {type(exc).__name__}: {exc}") from exc
    n_labels = getattr(model.config, "num_labels", 1)
    if n_labels != 1:
        raise ModelLoadError(f"{ref}: a reward model has exactly one output label, this one has {n_labels}")
    if is_decoder(model) and model.config.pad_token_id is None:
        # Our pooling does not use pad_token_id, but some forwards assert it exists.
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, card=card, path=path)


def position_limit(model: nn.Module) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def make_formatter(
    loaded: LoadedModel,
    style: str | None = None,
    max_length: int | None = None,
    chat_template: str | None = None,
    append_eos: bool | None = None,
) -> Formatter:
    """The formatter a model was trained with (its card), overridden by explicit settings."""
    card = loaded.card or {}
    tok = loaded.tokenizer
    if style is None:
        style = card.get("style")
    if style is None:
        if not is_decoder(loaded.model):
            style = "pair"
        else:
            style = "chat" if (chat_template or getattr(tok, "chat_template", None)) else "text"
    limit = position_limit(loaded.model)
    tok_limit = getattr(tok, "model_max_length", None)
    candidates = [v for v in (max_length or card.get("max_length"), limit, tok_limit) if v and v < 1_000_000]
    if not candidates:
        raise ModelLoadError(f"{loaded.path}: cannot tell the model's context length; set max_length")
    length = min(candidates) if max_length is None else min([max_length] + ([limit] if limit else []))
    if append_eos is None:
        append_eos = bool(card.get("append_eos", False))
    return Formatter(tok, style, length, chat_template=chat_template, append_eos=append_eos)  # type: ignore[arg-type]
