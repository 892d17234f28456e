"""Sampling from a real tiny GPT-2 causal LM built from a config."""

from __future__ import annotations

from pathlib import Path

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


def test_a_prompts_samples_do_not_depend_on_the_other_prompts(sampler: Sampler) -> None:
    args = SamplingArgs(max_new_tokens=10, batch_size=2, seed=3)
    both, _ = sampler.sample(PROMPTS, 3, args, progress=False)
    alone, _ = sampler.sample(PROMPTS[1:], 3, args, progress=False)
    assert [x.text for x in both[1]] == [x.text for x in alone[0]]


def test_shared_prefill_draws_what_plain_generation_draws(sampler: Sampler) -> None:
    """Greedy decoding from the copied prompt cache equals decoding with no cache at all."""
    ids, _ = sampler.encode_prompt(PROMPTS[0], 8)
    args = SamplingArgs(max_new_tokens=8, temperature=1e-4)
    shared = sampler._generate_shared(ids, 3, args, seed=1)
    assert sampler.shared_prefill, "the static-cache path fell back"
    sampler.shared_prefill = False
    try:
        plain = sampler._generate_shared(ids, 3, args, seed=1)
    finally:
        sampler.shared_prefill = True
    assert shared == plain


def test_bank_resumes_after_a_torn_write(sampler: Sampler, tmp_path: Path) -> None:
    from trainer.samples import fill_bank, read_bank

    bank = tmp_path / "bank.jsonl"
    args = SamplingArgs(max_new_tokens=8, batch_size=4, seed=0)
    counts = fill_bank(bank, PROMPTS, lambda: sampler, 3, args, progress=False)
    assert counts["sampled"] == 2 and counts["present"] == 0
    complete = read_bank(bank)
    text = bank.read_text()
    bank.write_text(text[: len(text) - 20])  # a crash in the middle of the last record
    assert len(read_bank(bank)) == 1
    counts = fill_bank(bank, PROMPTS, lambda: sampler, 3, args, progress=False)
    assert counts["present"] == 1 and counts["sampled"] == 1
    assert read_bank(bank) == complete  # the same samples as the uninterrupted run

    def no_policy() -> Sampler:
        raise AssertionError("a complete bank must not load the policy")

    assert fill_bank(bank, PROMPTS, no_policy, 3, args, progress=False)["present"] == 2
