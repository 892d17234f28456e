"""External trainers: OpenRLHF's /get_reward and verl's /classify, driven as those trainers do,
against a real `logand serve` subprocess; and reading chat-template text back into turns."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from service.chat_parse import RenderedChat, TemplateError
from tests.conftest import LiveServer
from tests.tiny import CHAT_TEMPLATE, gpt2_tokenizer, make_tiny_gpt2

# A ChatML template that injects a default system prompt when none is given (as SmolLM2's does).
CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Folds the system prompt into the first user turn: turns cannot be learnt from a probe.
FOLDING = (
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% elif m['role'] == "
    "'assistant' %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
)
CONVERSATION = [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Knead it."},
                {"role": "user", "content": "And then?"}]


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, CHATML, LLAMA3], ids=["tiny", "chatml", "llama3"])
def test_rendered_chat_reads_turns_back(template: str) -> None:
    tok = gpt2_tokenizer(chat_template=template)
    chat = RenderedChat(tok)
    prompt = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    end = chat.markup.footer.strip()
    query = prompt + "Bake it at 220 C." + end + tok.eos_token + tok.pad_token
    assert chat.split(query, prompt) == (CONVERSATION, "Bake it at 220 C.")
    assert chat.split(query, None) == (CONVERSATION, "Bake it at 220 C.")  # parsed from the query alone
    # whole tokens only: a response ending in characters of an end token keeps them
    assert chat.strip_end("ends in d>" + end) == ("ends in d>", 1)


def test_templates_that_hide_their_turns_are_refused_by_name() -> None:
    with pytest.raises(TemplateError):
        RenderedChat(gpt2_tokenizer(chat_template=FOLDING))


@pytest.fixture(scope="module")
def compat_server(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("compat")
    policy = make_tiny_gpt2(tmp / "policy", seed=9, chat_template=CHATML, lm=True)
    config = {
        "models": [{"name": "enc", "path": str(tiny_bert), "device": "cpu", "dtype": "float32",
                    "reference": {"type": "constant", "value": 0.1}},
                   {"name": "enc2", "path": str(tiny_bert), "device": "cpu", "dtype": "float32"}],
        "engine": {"max_wait_ms": 20, "threads": 1},
        "compat": {"policy_tokenizer": str(policy)},
    }
    server = LiveServer(config, tmp)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _batches(server: LiveServer, model: str) -> tuple[float, float]:
    text = httpx.get(server.url + "/metrics").text
    count = float(re.search(rf'logand_batch_size_count{{model="{model}"}} (\S+)', text).group(1))  # type: ignore[union-attr]
    total = float(re.search(rf'logand_batch_size_sum{{model="{model}"}} (\S+)', text).group(1))  # type: ignore[union-attr]
    return count, total


def test_get_reward_as_openrlhf_calls_it(compat_server: LiveServer) -> None:
    """Many concurrent one-sample requests rendered with the policy's chat template: every answer
    equals /v1/score on the parsed (messages, response), and the requests shared forward passes."""
    tok = gpt2_tokenizer(chat_template=CHATML)
    questions = [f"question number {i} about the dog and the cat" for i in range(48)]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in questions]
    responses = [f"answer {i}: the cat sat" for i in range(48)]
    queries = [pr + r + "<|im_end|>" + tok.eos_token for pr, r in zip(prompts, responses)]
    before = _batches(compat_server, "enc")

    def one(i: int) -> httpx.Response:
        return httpx.post(compat_server.url + "/get_reward", timeout=60,
                          json={"query": [queries[i]], "prompts": [prompts[i]], "labels": [None]})

    with ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(one, range(48)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:1]
    after = _batches(compat_server, "enc")
    batches, items = after[0] - before[0], after[1] - before[1]
    assert items == 48 and batches < 48, f"{batches} forward passes for 48 one-sample requests: not batched"

    expected = httpx.post(compat_server.url + "/v1/score", json={"items": [
        {"prompt": [{"role": "user", "content": q}], "response": r} for q, r in zip(questions, responses)]}).json()
    for a, e in zip(answers, expected["results"]):
        body = a.json()
        assert body["rewards"] == [pytest.approx(e["utility"], abs=1e-5)]
        assert body["scores"] == [pytest.approx(e["p_all"], abs=1e-6)] and 0 <= body["scores"][0] <= 1
        assert body["extra_logs"]["enc/reward"] == [pytest.approx(e["rewards"]["enc"], abs=1e-5)]
        assert body["extra_logs"]["enc2/utility"] == [pytest.approx(e["utilities"]["enc2"], abs=1e-5)]
        assert set(body) == {"rewards", "scores", "extra_logs"}


def test_get_reward_bad_input_names_the_sample(compat_server: LiveServer) -> None:
    url = compat_server.url + "/get_reward"
    r = httpx.post(url, json={"query": ["a", "b"], "prompts": ["a"]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "prompts"
    r = httpx.post(url, json={"query": []})
    assert r.status_code == 422
    r = httpx.post(url, json={"query": ["no template markup at all"], "prompts": ["something else"]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "query.0"
    # an empty response (the policy answered EOS at once) is scored, not refused
    prompt = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    r = httpx.post(url, json={"query": [prompt + "<|im_end|>"], "prompts": [prompt], "extra": 1})
    assert r.status_code == 200 and len(r.json()["rewards"]) == 1


def test_classify_answers_in_the_shape_verl_reads(compat_server: LiveServer) -> None:
    tok = gpt2_tokenizer(chat_template=CHATML)
    texts = [tok.apply_chat_template(CONVERSATION + [{"role": "assistant", "content": f"Bake it {i}."}],
                                     tokenize=False) for i in range(3)]
    body = {"model": "logand", "input": texts, "activation": False, "add_special_tokens": False}
    r = httpx.post(compat_server.url + "/classify", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [d["index"] for d in out["data"]] == [0, 1, 2] and out["usage"]["prompt_tokens"] > 0
    expected = httpx.post(compat_server.url + "/v1/score", json={"items": [
        {"prompt": CONVERSATION, "response": f"Bake it {i}."} for i in range(3)]}).json()["results"]
    assert [d["probs"][-1] for d in out["data"]] == pytest.approx([e["utility"] for e in expected], abs=1e-5)
    assert all(d["num_classes"] == 1 for d in out["data"])
    # activation (vLLM's default): p(all good); a hosted model's name: its raw reward
    prob = httpx.post(compat_server.url + "/classify", json={"input": texts[0]}).json()
    assert prob["data"][0]["probs"][-1] == pytest.approx(expected[0]["p_all"], abs=1e-6)
    raw = httpx.post(compat_server.url + "/classify", json={"model": "enc2", "input": texts[0], "activation": False})
    assert raw.json()["data"][0]["probs"][-1] == pytest.approx(expected[0]["rewards"]["enc2"], abs=1e-5)
    bad = httpx.post(compat_server.url + "/classify", json={"input": ["fine?", 3]})
    assert bad.status_code == 422


# A template whose only end-of-turn is a blank line (DeepSeek-style): it also occurs inside turns.
BLANKLINE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n\n{% elif m['role'] == 'assistant' %}"
    "Assistant: {{ m['content'] }}\n\n{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


def test_left_padded_queries_and_empty_answers_as_trainers_send_them() -> None:
    tok = gpt2_tokenizer(chat_template=CHATML)
    chat = RenderedChat(tok)
    prompt = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    padded = tok.pad_token * 3 + prompt + "Bake it." + "<|im_end|>" + tok.eos_token + tok.pad_token * 2
    assert chat.split(padded, prompt) == (CONVERSATION, "Bake it.")
    assert chat.split(padded, None) == (CONVERSATION, "Bake it.")
    assert chat.split(prompt + "<|im_end|>", None) == (CONVERSATION, "")  # an empty answer is kept, as ""


def test_blank_line_footers_do_not_cut_paragraphs() -> None:
    chat = RenderedChat(gpt2_tokenizer(chat_template=BLANKLINE))
    text = "User: first line\n\nsecond paragraph\n\nAssistant: one\n\ntwo\n\n"
    assert chat.split(text, None) == ([{"role": "user", "content": "first line\n\nsecond paragraph"}], "one\n\ntwo")


def test_passthrough_cuts_the_policy_tokenizers_pads_and_eos() -> None:
    from service.compat import TrainerAdapter
    from service.config import CompatConfig

    tok = gpt2_tokenizer()
    adapter = TrainerAdapter(CompatConfig(prompt_format="passthrough", end_tokens=["", "</s>"]), tokenizer=tok)
    prompt = "\n\nHuman: hi\n\nAssistant:"
    query = tok.pad_token * 2 + prompt + " Hello there." + "</s>" + tok.eos_token + tok.pad_token
    assert adapter.query_item(query, prompt, "query.0") == (prompt, "Hello there.")
