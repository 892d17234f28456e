"""Sampling from a real tiny GPT-2 causal LM built from a config."""

from __future__ import annotations

import pytest

from tests.tiny import CHAT_TEMPLATE, make_tiny_gpt2
from trainer.sampling import Sampler, SamplingArgs

PROMPTS = ["\n\nHuman: how do i bake a cake\n\nAssistant:",
           [{"role": "user", "content": "tell me about the weather"}]]


@pytest.fixture(scope="module", params=["chat", "text"])
def sampler(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Sampler:
    template = CHAT_TEMPLATE if request.param == "chat" else None
    path = make_tiny_gpt2(tmp_path_factory.mktemp("policy") / "lm", seed=5, chat_template=template, lm=True)
    return Sampler(path)


def test_samples_per_prompt_in_order_and_reproducible(sampler: Sampler) -> None:
    args = SamplingArgs(max_new_tokens=12, batch_size=4, seed=7)
    first, stats = sampler.sample(PROMPTS, 3, args, progress=False)
    again, _ = sampler.sample(PROMPTS, 3, args, progress=False)
    other, _ = sampler.sample(PROMPTS, 3, SamplingArgs(max_new_tokens=12, batch_size=4, seed=8), progress=False)
    assert [len(s) for s in first] == [3, 3]
    assert [[x.text for x in s] for s in first] == [[x.text for x in s] for s in again]
    assert [[x.text for x in s] for s in first] != [[x.text for x in s] for s in other]
    assert all(0 < x.tokens <= 12 or x.text == "" for s in first for x in s)
    assert stats.samples == 6 and stats.prompts == 2 and stats.prompt_truncated == 0
    assert stats.empty + sum(bool(x.text) for s in first for x in s) == 6
    assert not any("<|" in x.text for s in first for x in s)  # special tokens are not text


def test_long_prompts_are_cut_from_the_left_and_counted(sampler: Sampler) -> None:
    long = "\n\nHuman: " + "the dog and the cat " * 80 + "\n\nAssistant:"
    ids, cut = sampler.encode_prompt(long, max_new_tokens=16)
    assert cut > 0 and len(ids) == sampler.context - 16
    _, stats = sampler.sample([long], 2, SamplingArgs(max_new_tokens=16), progress=False)
    assert stats.prompt_truncated == 1
