"""onnxruntime backend, and ``logand export-onnx`` which writes what it loads.

An exported directory holds ``model.onnx`` (inputs ``input_ids``, ``attention_mask`` and, for
encoders with segment ids, ``token_type_ids``, all (B, T) int64; output ``reward`` (B,)), the
tokenizer files, and a ``logand.json`` card copied from the source with ``onnx`` details added.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..formatting import Encoded, Formatter
from .base import Backend, BackendInfo, pad_batch, revision_of
from .modeling import CARD_NAME, ModelLoadError, read_card

log = logging.getLogger(__name__)
ONNX_FILE = "model.onnx"
QUANTIZED_FILE = "model.int8.onnx"


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise ModelLoadError(
                "device cuda asked for the onnx backend, but onnxruntime has no CUDA provider "
                "(install onnxruntime-gpu)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxBackend(Backend):
    def __init__(
        self, path: str, device: str = "cpu", threads: int | None = None,
        max_length: int | None = None, style: str | None = None,
        chat_template: str | None = None, append_eos: bool | None = None, quantize: str = "none",
    ) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        root = Path(path)
        if not (root / ONNX_FILE).is_file():
            raise ModelLoadError(f"{path}: no {ONNX_FILE} (make one with 'logand export-onnx')")
        card = read_card(root) or {}
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        graph = root / ONNX_FILE if quantize == "none" else quantized_graph(root, quantize)
        self.session = ort.InferenceSession(str(graph), opts, providers=providers_for(device))
        self._inputs = {i.name for i in self.session.get_inputs()}
        tok = AutoTokenizer.from_pretrained(root)
        onnx_meta = card.get("onnx", {})
        self.formatter = Formatter(
            tok,
            style or card.get("style") or onnx_meta.get("style", "pair"),  # type: ignore[arg-type]
            max_length or card.get("max_length") or onnx_meta["max_length"],
            chat_template=chat_template,
            append_eos=card.get("append_eos", False) if append_eos is None else append_eos,
        )
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.info = BackendInfo(
            kind="onnx", device=device, dtype="float32" if quantize == "none" else quantize,
            max_length=self.formatter.max_length,
            style=self.formatter.style, revision=revision_of(root), path=str(root),
            architecture=onnx_meta.get("architecture", "encoder"),
        )

    def score(self, batch: Sequence[Encoded]) -> list[float]:
        ids, mask, types = pad_batch(batch, self._pad, "token_type_ids" in self._inputs)
        feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            feeds["token_type_ids"] = types
        (rewards,) = self.session.run(["reward"], feeds)  # (B,)
        return np.asarray(rewards, dtype=np.float64).tolist()


def quantized_graph(root: Path, quantize: str) -> Path:
    """``model.int8.onnx`` beside ``model.onnx``: made on first use (dynamic quantisation of the
    MatMul weights to int8; activations are quantised per batch at run time), then reused.  A
    read-only model directory gets it in a per-user cache folder instead."""
    if quantize != "int8":
        raise ModelLoadError(f"unknown quantize {quantize!r} (choose none or int8)")
    src = root / ONNX_FILE
    target = root / QUANTIZED_FILE
    if target.is_file() and target.stat().st_mtime >= src.stat().st_mtime:
        return target
    if not os.access(root, os.W_OK):
        cache = Path(tempfile.gettempdir()) / f"logand-onnx-{os.getuid()}" / revision_of(root)
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / QUANTIZED_FILE
        if target.is_file():
            return target
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Written under a temporary name and renamed, so a concurrent loader never reads half a file.
    partial = target.with_suffix(f".{os.getpid()}.partial")
    quantize_dynamic(str(src), str(partial), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    partial.replace(target)
    log.info("quantised %s to int8: %s", src, target)
    return target


def export_onnx(src: str, out: str | Path, base_dir: Path | None = None, check: bool = True) -> dict[str, Any]:
    """Export the reward model at ``src`` to ``out``; returns the parity figures when ``check``."""
    import torch

    from .modeling import load_reward_model, make_formatter, reward_forward

    loaded = load_reward_model(src, base_dir=base_dir)
    formatter = make_formatter(loaded)
    with_types = loaded.uses_token_types()

    class _Reward(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):  # type: ignore[no-untyped-def]
            return reward_forward(self.model, input_ids, attention_mask, token_type_ids)

    sample = [
        formatter.encode("\n\nHuman: Hello, how are you today?\n\nAssistant:", "Fine, thanks for asking!"),
        formatter.encode("\n\nHuman: Hi\n\nAssistant:", "Hello."),
    ]
    pad = loaded.tokenizer.pad_token_id or 0
    ids, mask, types = pad_batch(sample, pad, with_types)
    args: tuple[Any, ...] = (torch.from_numpy(ids), torch.from_numpy(mask))
    names = ["input_ids", "attention_mask"]
    if types is not None:
        args += (torch.from_numpy(types),)
        names.append("token_type_ids")
    batch = torch.export.Dim("batch", min=1, max=65536)
    seq = torch.export.Dim("seq", min=2, max=max(formatter.max_length, 3))
    shapes = {n: {0: batch, 1: seq} for n in names}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        _Reward(loaded.model).eval(), args, str(out / ONNX_FILE), input_names=names, output_names=["reward"],
        dynamic_shapes=shapes, dynamo=True, external_data=False,
    )
    loaded.tokenizer.save_pretrained(out)
    card = dict(loaded.card or {})
    card.update(style=formatter.style, max_length=formatter.max_length, append_eos=formatter.append_eos)
    card["onnx"] = {
        "source": str(src), "style": formatter.style, "max_length": formatter.max_length,
        "architecture": loaded.architecture, "opset": "dynamo",
    }
    result: dict[str, Any] = {"path": str(out)}
    if check:
        result.update(onnx_parity(loaded, out))
        card["onnx"]["parity_max_abs_diff"] = result["max_abs_diff"]
    (out / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return result


def onnx_parity(loaded: Any, onnx_dir: str | Path, texts: Sequence[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Max |torch − onnxruntime| over a padded batch of varied lengths."""
    from .torch_backend import TorchBackend

    torch_backend = TorchBackend(loaded, "float32", "cpu")
    onnx_backend = OnnxBackend(str(onnx_dir), max_length=torch_backend.formatter.max_length,
                               style=torch_backend.formatter.style)
    texts = texts or [
        ("\n\nHuman: What is a good recipe for bread?\n\nAssistant:", "Mix flour, water, salt and yeast, then bake."),
        ("\n\nHuman: Hi\n\nAssistant:", "Hello!"),
        ("\n\nHuman: Tell me a joke.\n\nAssistant: Why?\n\nHuman: Because.\n\nAssistant:", "No."),
    ]
    batch = [torch_backend.formatter.encode(p, r, allow_truncation=True) for p, r in texts]
    a = np.array(torch_backend.score(batch))
    b = np.array(onnx_backend.score(batch))
    return {"max_abs_diff": float(np.max(np.abs(a - b))), "torch": a.tolist(), "onnx": b.tolist()}

