"""Backends on real tiny transformers: batching parity, decoder pooling, adapters, dtypes, ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.backends import load_backend
from service.backends.modeling import ModelLoadError, load_reward_model, reward_forward
from service.backends.onnx_backend import export_onnx
from service.config import ModelConfig

PROMPTS = [
    "\n\nHuman: how do i bake a cake\n\nAssistant:",
    "\n\nHuman: what is the weather\n\nAssistant: it is cold\n\nHuman: and tomorrow\n\nAssistant:",
    "\n\nHuman: hi\n\nAssistant:",
]
RESPONSES = ["first buy flour then bake", "rain", "hello my friend how are you today i hope you are well"]
PAIRS = [(p, r) for p in PROMPTS for r in RESPONSES]


def backend_for(path: Path, **kw):
    return load_backend(ModelConfig(name="m", path=str(path), device="cpu", **{"dtype": "float32", **kw}), None)


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_gpt2"])
def test_batched_equals_unbatched(model: str, request: pytest.FixtureRequest) -> None:
    backend = backend_for(request.getfixturevalue(model))
    encoded = [backend.formatter.encode(p, r) for p, r in PAIRS]
    assert len({len(e) for e in encoded}) > 3  # lengths differ: padding is exercised
    batched = np.array(backend.score(encoded))
    single = np.array([backend.score([e])[0] for e in encoded])
    np.testing.assert_allclose(batched, single, atol=1e-4)
    assert np.std(single) > 0  # a real model: different inputs, different rewards


def test_decoder_pools_at_last_real_token_even_when_pad_is_eos(tiny_gpt2: Path, tmp_path: Path) -> None:
    loaded = load_reward_model(tiny_gpt2)
    eos = loaded.tokenizer.eos_token_id
    ids = torch.tensor([[5, 6, 7, eos], [5, 6, 7, eos]])
    padded = torch.tensor([[5, 6, 7, eos, eos, eos], [5, 6, 7, eos, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    with torch.inference_mode():
        plain = reward_forward(loaded.model, ids, torch.ones_like(ids))
        both = reward_forward(loaded.model, padded, mask)
    torch.testing.assert_close(both, plain, atol=1e-5, rtol=0)
    assert loaded.tokenizer.pad_token_id != eos


def test_raw_logit_not_sigmoid(tiny_bert: Path) -> None:
    backend = backend_for(tiny_bert)
    loaded = load_reward_model(tiny_bert)
    e = backend.formatter.encode(*PAIRS[0])
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([e.input_ids]),
                              token_type_ids=torch.tensor([e.token_type_ids])).logits
    assert backend.score([e])[0] == pytest.approx(float(logits[0, 0]), abs=1e-5)


def test_peft_adapter_directory_is_loaded_and_merged(tiny_bert: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    peft_model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                                 modules_to_save=["classifier"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "classifier" in name:
                param.add_(torch.randn_like(param) * 0.5)  # a trained adapter is not the identity
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(adapter_dir)

    backend = backend_for(adapter_dir)
    encoded = [backend.formatter.encode(p, r) for p, r in PAIRS[:4]]
    peft_model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert), adapter_dir).eval()
    plain = backend_for(tiny_bert)
    for e in encoded:
        with torch.inference_mode():
            want = reloaded(input_ids=torch.tensor([e.input_ids]), token_type_ids=torch.tensor([e.token_type_ids])).logits[0, 0]
        assert backend.score([e])[0] == pytest.approx(float(want), abs=1e-5)
    assert backend.score(encoded) != pytest.approx(plain.score(encoded), abs=1e-3)  # the adapter changed scores


def test_bf16_tracks_fp32(tiny_bert: Path) -> None:
    fp32 = backend_for(tiny_bert)
    bf16 = backend_for(tiny_bert, dtype="bfloat16")
    assert bf16.info.dtype == "bfloat16"
    encoded = [fp32.formatter.encode(p, r) for p, r in PAIRS]
    np.testing.assert_allclose(bf16.score(encoded), fp32.score(encoded), atol=0.05)


def test_multi_label_model_is_refused(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from tests.tiny import bert_tokenizer

    tok = bert_tokenizer()
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=1, intermediate_size=16, num_labels=3)
                                  ).save_pretrained(tmp_path / "m3")
    tok.save_pretrained(tmp_path / "m3")
    with pytest.raises(ModelLoadError, match="exactly one output label"):
        backend_for(tmp_path / "m3")


def test_missing_model_fails_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model 'm'.*does not exist"):
        backend_for(tmp_path / "nope")


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_gpt2"])
def test_onnx_export_matches_torch(model: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    src = request.getfixturevalue(model)
    result = export_onnx(str(src), tmp_path / "onnx")
    assert result["max_abs_diff"] < 1e-3
    torch_b = backend_for(src)
    onnx_b = load_backend(ModelConfig(name="m", path=str(tmp_path / "onnx"), backend="onnx", device="cpu"), None)
    assert onnx_b.info.kind == "onnx" and onnx_b.formatter.style == torch_b.formatter.style
    encoded = [torch_b.formatter.encode(p, r) for p, r in PAIRS]
    np.testing.assert_allclose(onnx_b.score(encoded), torch_b.score(encoded), atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, atol", [("float32", 1e-3), ("bfloat16", 0.05), ("float16", 0.02)])
def test_cuda_matches_cpu(tiny_bert: Path, dtype: str, atol: float) -> None:
    cpu = backend_for(tiny_bert)
    gpu = load_backend(ModelConfig(name="m", path=str(tiny_bert), device="cuda", dtype=dtype), None)
    encoded = [cpu.formatter.encode(p, r) for p, r in PAIRS]
    np.testing.assert_allclose(gpu.score(encoded), cpu.score(encoded), atol=atol)
