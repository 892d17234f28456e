"""Preference loading, bad-row accounting, prompt splits and length-sorted batching."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from service.formatting import ASSISTANT, HUMAN
from trainer.data import (
    SPLITS,
    DataError,
    PreferencePair,
    length_batches,
    load_many,
    load_preferences,
    parse_row,
    split_of,
    split_pairs,
    split_transcripts,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HH_FILES = sorted((DATA / "hh-rlhf").glob("*.jsonl.gz"))
needs_data = pytest.mark.skipif(not HH_FILES, reason=f"HH-RLHF data not found under {DATA / 'hh-rlhf'}")


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- HH transcripts ------------------------------------------------------------------------
@pytest.mark.data
@needs_data
@pytest.mark.parametrize("path", HH_FILES, ids=lambda p: p.name)
def test_hh_transcripts_split_into_prompt_and_final_turns(path: Path) -> None:
    rows = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    pairs, report = load_preferences(path)
    assert report.rows == len(rows)
    assert report.pairs == len(pairs) == len(rows) - sum(report.skipped.values())
    assert len(pairs) > 0.99 * len(rows)
    assert set(report.skipped) <= {"identical", "empty_response", "no_common_prompt"}

    by_row = {}
    for row in rows:
        got = parse_row(row)
        if isinstance(got, PreferencePair):
            by_row[id(got)] = (row, got)
    multi = 0
    checked = 0
    for row, pair in by_row.values():
        assert pair.prompt.endswith(ASSISTANT)
        assert pair.prompt.startswith(HUMAN)
        assert pair.chosen and pair.rejected and pair.chosen != pair.rejected
        assert pair.chosen == pair.chosen.strip() and not pair.chosen.startswith(" ")
        # the responses are exactly what follows the prompt: the final assistant turns
        assert row["chosen"].startswith(pair.prompt) and row["rejected"].startswith(pair.prompt)
        assert _squash(pair.prompt + " " + pair.chosen) == _squash(row["chosen"])
        assert _squash(pair.prompt + " " + pair.rejected) == _squash(row["rejected"])
        assert row["chosen"][len(pair.prompt):].strip() == pair.chosen
        multi += pair.prompt.count(HUMAN) > 1
        checked += 1
    assert checked == len(pairs)
    assert multi > 0.5 * checked  # ~70% of HH rows are multi-turn


def test_split_uses_last_marker_inside_the_common_prefix() -> None:
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: cook?\n\nAssistant:"
    # the common character prefix runs into the responses ("I think ...")
    pair = split_transcripts(prompt + " I think yes, bake it.", prompt + " I think no.")
    assert pair == PreferencePair(prompt, "I think yes, bake it.", "I think no.")
    # responses that themselves contain a marker stay whole
    pair = split_transcripts(prompt + " A\n\nAssistant: B", prompt + " C")
    assert isinstance(pair, PreferencePair) and pair.prompt == prompt and pair.chosen == "A\n\nAssistant: B"


def test_generic_rows_with_string_and_message_prompts() -> None:
    plain = parse_row({"prompt": "What is tea?", "chosen": " A drink.", "rejected": "No idea."})
    assert plain == PreferencePair("\n\nHuman: What is tea?\n\nAssistant:", "A drink.", "No idea.")
    hh = parse_row({"prompt": "\n\nHuman: What is tea?\n\nAssistant:", "chosen": "A drink.", "rejected": "x"})
    assert isinstance(hh, PreferencePair) and hh.prompt == plain.prompt
    chat = parse_row({
        "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                   {"role": "user", "content": "What is tea?"}],
        "chosen": [{"role": "assistant", "content": "A drink."}], "rejected": "x",
    })
    assert chat == PreferencePair(
        "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: What is tea?\n\nAssistant:", "A drink.", "x"
    )


def test_bad_rows_are_counted_per_reason(tmp_path: Path) -> None:
    p = "\n\nHuman: hi\n\nAssistant:"
    rows: list[object] = [
        {"chosen": p + " good answer", "rejected": p + " bad answer"},  # ok (HH)
        {"prompt": "hi", "chosen": "good", "rejected": "bad"},  # ok (generic)
        {"chosen": p + " only chosen"},  # missing_keys
        {"prompt": "hi", "rejected": "x"},  # missing_keys
        {"chosen": 3, "rejected": p + " x"},  # not_a_string
        {"prompt": ["not a message"], "chosen": "a", "rejected": "b"},  # not_a_string
        {"chosen": p + " same", "rejected": p + " same"},  # identical
        {"prompt": "hi", "chosen": "same ", "rejected": " same"},  # identical after strip
        {"chosen": "\n\nHuman: a b", "rejected": "\n\nHuman: c d"},  # no_common_prompt
        {"chosen": p + " text", "rejected": p + "   "},  # empty_response
        ["a", "list"],  # not_an_object
        "{not json",  # bad_json
    ]
    pairs, report = load_preferences(_write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert pairs == [PreferencePair(p, "good answer", "bad answer"),
                     PreferencePair("\n\nHuman: hi\n\nAssistant:", "good", "bad")]
    assert report.rows == len(rows) and report.pairs == 2
    assert report.skipped == Counter(missing_keys=2, not_a_string=2, identical=2, no_common_prompt=1,
                                     empty_response=1, not_an_object=1, bad_json=1)
    assert "missing_keys: 2" in report.summary()


def test_gzip_and_json_sources(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    gz = tmp_path / "rows.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    js = tmp_path / "rows.json"
    js.write_text(json.dumps(rows))
    pairs, report = load_many([gz, js])
    assert len(pairs) == 6 and report.rows == 6 and report.sources == [str(gz), str(js)]


def test_unusable_sources_raise_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_preferences(missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=re.escape(str(empty))):
        load_preferences(empty)
    junk = _write_jsonl(tmp_path / "junk.jsonl", [{"a": 1}, {"chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match="no valid pairs") as err:
        load_preferences(junk)
    assert str(junk) in str(err.value)
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=re.escape(str(corrupt))):
        load_preferences(corrupt)


def test_hub_source_without_datasets_library_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: `import datasets` fails
    with pytest.raises(DataError, match="pip install datasets"):
        load_preferences("hub:Anthropic/hh-rlhf:helpful-base")


# -- splits --------------------------------------------------------------------------------
def test_split_is_deterministic_disjoint_and_sized() -> None:
    prompts = [f"\n\nHuman: question number {i}?\n\nAssistant:" for i in range(2000)]
    first = [split_of(p) for p in prompts]
    assert first == [split_of(p) for p in prompts]
    assert first[::-1] == [split_of(p) for p in reversed(prompts)]  # order-independent
    counts = Counter(first)
    assert set(counts) == set(SPLITS)
    expected = {"rm_train": 0.4, "rm_heldout": 0.1, "align_train": 0.4, "align_heldout": 0.1}
    for name, frac in expected.items():
        assert abs(counts[name] / len(prompts) - frac) < 0.04, (name, counts)
    # another seed reshuffles, and the held-out fraction moves the boundary
    assert [split_of(p, seed=1) for p in prompts] != first
    wide = Counter(split_of(p, heldout_fraction=0.5) for p in prompts)
    assert abs(wide["rm_heldout"] / len(prompts) - 0.25) < 0.04
    assert all(split_of(p, heldout_fraction=0.0) in ("rm_train", "align_train") for p in prompts[:200])


def test_split_pairs_keeps_a_prompt_in_one_split() -> None:
    pairs = [PreferencePair(f"\n\nHuman: q{i % 300}\n\nAssistant:", f"good {i}", f"bad {i}") for i in range(1200)]
    groups = split_pairs(pairs, heldout_fraction=0.2, seed=3)
    assert sum(map(len, groups.values())) == len(pairs)
    seen: dict[str, str] = {}
    for name, members in groups.items():
        for pair in members:
            assert seen.setdefault(pair.prompt, name) == name


# -- batching ------------------------------------------------------------------------------
def test_length_batches_cover_everything_with_little_padding() -> None:
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    batches = length_batches(lengths, 16, seed=1)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    assert all(len(b) <= 16 for b in batches)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.05 * sum(lengths)  # sorted chunks: ~no padding waste
    assert batches == length_batches(lengths, 16, seed=1)
    assert batches != length_batches(lengths, 16, seed=2)  # shuffled chunk order
    ordered = length_batches(lengths, 16, seed=None)  # evaluation: plain length order
    assert [max(lengths[i] for i in b) for b in ordered] == sorted(max(lengths[i] for i in b) for b in ordered)


def test_length_batches_respect_a_token_budget() -> None:
    lengths = [10] * 20 + [100] * 5 + [300]
    batches = length_batches(lengths, batch_size=8, seed=0, max_tokens=250)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) <= 8
        assert len(b) * longest <= 250 or len(b) == 1  # an over-budget item batches alone
    assert [25] in batches
