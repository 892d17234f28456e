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


def test_bf16_on_a_cpu_without_it_warns_and_the_probe_matches_the_kernels_flags(
        tiny_bert: Path, caplog: pytest.LogCaptureFixture) -> None:
    from service.backends.modeling import cpu_has_native_bf16

    native = cpu_has_native_bf16()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = cpuinfo.read_text()
        assert native == ("avx512_bf16" in flags or "amx_bf16" in flags)
    with caplog.at_level("WARNING", logger="service.backends"):
        backend_for(tiny_bert, dtype="bfloat16")
    warned = [r.getMessage() for r in caplog.records if "without native bf16" in r.getMessage()]
    assert len(warned) == (0 if native else 1), warned
    assert all("'m'" in w and "dtype: float32" in w for w in warned)


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


BEST_OF_K_PROMPT = ("\n\nHuman: what is a good recipe for bread and how long do i bake it for\n\nAssistant: flour "
                    "water salt and yeast\n\nHuman: and how long do i bake it\n\nAssistant:")


@pytest.mark.parametrize("style", ["chat", "text"])
def test_prompt_kv_reuse_matches_full_forward(tiny_gpt2: Path, style: str) -> None:
    reuse = backend_for(tiny_gpt2, style=style)
    plain = backend_for(tiny_gpt2, style=style, reuse_prefix=False)
    assert reuse.reuse_prefix and not plain.reuse_prefix
    # best-of-k: one prompt, many responses; plus an item of another prompt in the same batch
    encoded = [reuse.formatter.encode(BEST_OF_K_PROMPT, r) for r in RESPONSES + ["no", "sure thing", "a b c d e f"]]
    encoded.append(reuse.formatter.encode(PROMPTS[2], RESPONSES[0]))
    assert encoded[0].prefix_len >= 16 and len({e.prefix_len for e in encoded[:-1]}) == 1
    assert encoded[0].input_ids[: encoded[0].prefix_len] == encoded[1].input_ids[: encoded[1].prefix_len]
    with_reuse = np.array(reuse.score(encoded))
    without = np.array(plain.score(encoded))
    one_by_one = np.array([plain.score([e])[0] for e in encoded])
    np.testing.assert_allclose(with_reuse, without, atol=1e-4)
    np.testing.assert_allclose(with_reuse, one_by_one, atol=1e-4)
    assert np.std(with_reuse) > 0


def test_prefix_len_marks_the_prompt_tokens(tiny_bert: Path, tiny_gpt2: Path) -> None:
    enc = backend_for(tiny_bert).formatter.encode(PROMPTS[0], RESPONSES[0])
    assert enc.token_type_ids[enc.prefix_len - 1] == 0 and enc.token_type_ids[enc.prefix_len + 1] == 1  # [SEP] between
    dec = backend_for(tiny_gpt2).formatter
    a, b = dec.encode(PROMPTS[1], "yes"), dec.encode(PROMPTS[1], "no thanks")
    assert a.input_ids[: a.prefix_len] == b.input_ids[: b.prefix_len] and a.prefix_len < len(a)


def test_bf16_ranking_agrees_with_fp32(tiny_bert: Path, tmp_path: Path) -> None:
    """The bench's agreement check (pairwise accuracy within 0.5 point) on a tiny model whose
    rewards are spread out (a fresh tiny model's are all ≈ equal): pairs are half the ranks apart."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from service.bench.measure import pairwise_agreement

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    torch.manual_seed(0)
    with torch.no_grad():
        for w in model.parameters():
            if w.dim() == 2:
                w.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path / "spread")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / "spread")
    fp32, bf16 = backend_for(tmp_path / "spread"), backend_for(tmp_path / "spread", dtype="bfloat16")
    items = [fp32.formatter.encode(p, r) for p in PROMPTS for r in RESPONSES + ["yes", "no", "maybe later"]]
    order = np.argsort(fp32.score(items))  # ranks → pairs (rank k + n/2 over rank k), chosen first
    half = len(order) // 2
    flat = [items[int(k)] for i in range(half) for k in (order[i + half], order[i])]
    ref = fp32.score(flat)
    assert np.std(ref) > 0.1  # rewards spread out, so margins dwarf bf16 rounding
    result = pairwise_agreement(ref, bf16.score(flat))
    assert result["accuracy_reference"] == 1.0 and result["ok"] and result["order_flips"] == 0, result


def test_onnx_int8_quantized_tracks_fp32(tiny_bert: Path, tmp_path: Path) -> None:
    export_onnx(str(tiny_bert), tmp_path / "onnx", check=False)
    fp32 = load_backend(ModelConfig(name="m", path=str(tmp_path / "onnx"), backend="onnx", device="cpu"), None)
    int8 = load_backend(ModelConfig(name="m", path=str(tmp_path / "onnx"), backend="onnx", device="cpu",
                                    quantize="int8"), None)
    assert int8.info.dtype == "int8" and (tmp_path / "onnx" / "model.int8.onnx").is_file()
    encoded = [fp32.formatter.encode(p, r) for p, r in PAIRS]
    np.testing.assert_allclose(int8.score(encoded), fp32.score(encoded), atol=0.05)


def test_quantize_is_refused_on_torch(tiny_bert: Path) -> None:
    with pytest.raises(ModelLoadError, match="onnx-backend option"):
        backend_for(tiny_bert, quantize="int8")
