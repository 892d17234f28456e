"""Preference pairs: loading, validation, the prompt-level split, and length-sorted batching.

Sources (:func:`load_preferences`):

* a local ``.jsonl`` / ``.jsonl.gz`` / ``.json`` file whose rows are either HH-RLHF transcripts
  ``{"chosen": dialogue, "rejected": dialogue}`` or generic ``{"prompt", "chosen", "rejected"}``
  (the prompt a string or a list of chat messages);
* ``hub:NAME[:DATA_DIR][@SPLIT]``, e.g. ``hub:Anthropic/hh-rlhf:helpful-base`` (split ``train``
  unless given), read with the optional ``datasets`` library where a network exists.

Every row goes through :func:`parse_row`; a bad row is counted under its reason in a
:class:`LoadReport` and skipped, never silently turned into a pair.  A source that cannot be
read, or that yields no valid pair, raises :class:`DataError` naming it.

Splits (:func:`split_of`) are a pure function of the prompt text, so a prompt lands in the same
split whatever the file order, and no prompt is in two splits (the paper's protocol: one half
of the prompts for reward models, the other for alignment, a held-out slice of each).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from service.formatting import ASSISTANT, HUMAN, parse_hh, render_hh

SPLITS = ("rm_train", "rm_heldout", "align_train", "align_heldout")
HUB_PREFIX = "hub:"


class DataError(ValueError):
    """A preference source that cannot be used at all (unreadable, missing, or no valid pair)."""


@dataclass(frozen=True, slots=True)
class PreferencePair:
    prompt: str  # HH transcript ending in "\n\nAssistant:"
    chosen: str  # response text, without the leading space
    rejected: str


@dataclass
class LoadReport:
    """What a load did: rows seen, pairs kept, rows skipped per reason."""

    sources: list[str] = field(default_factory=list)
    rows: int = 0
    pairs: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def merge(self, other: LoadReport) -> LoadReport:
        return LoadReport(
            self.sources + other.sources, self.rows + other.rows, self.pairs + other.pairs,
            self.skipped + other.skipped,
        )

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{', '.join(self.sources)}: {self.rows} rows, {self.pairs} pairs, "
            f"{skipped} skipped ({reasons})"
        )


# -- row parsing ---------------------------------------------------------------------------
BAD_JSON = object()  # stands for a file line that is not JSON, so it is counted like any bad row


def split_transcripts(chosen: str, rejected: str) -> PreferencePair | str:
    """Split two HH transcripts at the last ``Assistant:`` marker they share.

    The common character prefix may run into the responses (both start "I think ..."), so the
    split point is the last marker *inside* the common prefix, not the prefix's end.  Returns
    the pair, or a skip reason.
    """
    if chosen == rejected:
        return "identical"
    common = os.path.commonprefix([chosen, rejected])
    at = common.rfind(ASSISTANT)
    if at < 0:
        return "no_common_prompt"
    end = at + len(ASSISTANT)
    prompt = chosen[:end]
    good, bad = chosen[end:].strip(), rejected[end:].strip()
    if not good or not bad:
        return "empty_response"
    if good == bad:
        return "identical"
    return PreferencePair(prompt, good, bad)


def _prompt_text(prompt: Any) -> str | None:
    """A prompt as an HH transcript ending in the assistant marker, or None if unusable."""
    if isinstance(prompt, str):
        text = prompt.rstrip()
        if not text.strip():
            return None
        if text.endswith(ASSISTANT):
            return text
        if HUMAN in "\n\n" + text.lstrip("\n"):  # a transcript without the trailing marker
            messages = parse_hh(text)
            return render_hh(messages) if messages else None
        return render_hh([{"role": "user", "content": text.strip()}])
    if isinstance(prompt, list) and prompt:
        if not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        ):
            return None
        return render_hh([{"role": m["role"], "content": m["content"]} for m in prompt])
    return None


def _response_text(value: Any) -> str | None:
    """A response: a string, or chat messages whose last turn is the assistant's."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], Mapping):
        last = value[-1]
        if last.get("role") == "assistant" and isinstance(last.get("content"), str):
            return last["content"]
    return None


def parse_row(row: Any) -> PreferencePair | str:
    """One data row to a pair, or the reason it is skipped.

    Rows with a ``prompt`` key are generic; rows without one are HH transcript pairs.
    """
    if not isinstance(row, Mapping):
        return "not_an_object"
    if "chosen" not in row or "rejected" not in row:
        return "missing_keys"
    if "prompt" not in row:
        chosen, rejected = row["chosen"], row["rejected"]
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            return "not_a_string"
        return split_transcripts(chosen, rejected)
    prompt = _prompt_text(row["prompt"])
    good, bad = _response_text(row["chosen"]), _response_text(row["rejected"])
    if prompt is None or good is None or bad is None:
        return "not_a_string"
    good, bad = good.strip(), bad.strip()
    if not good or not bad:
        return "empty_response"
    if good == bad:
        return "identical"
    return PreferencePair(prompt, good, bad)


def parse_rows(rows: Iterable[Any], source: str) -> tuple[list[PreferencePair], LoadReport]:
    pairs: list[PreferencePair] = []
    report = LoadReport(sources=[source])
    for row in rows:
        report.rows += 1
        got = "bad_json" if row is BAD_JSON else parse_row(row)
        if isinstance(got, str):
            report.skipped[got] += 1
        else:
            pairs.append(got)
    report.pairs = len(pairs)
    return pairs, report




def _read_file(path: Path) -> Iterator[Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        name = path.name[:-3] if path.suffix == ".gz" else path.name
        if name.endswith(".json"):
            data = json.load(fh)
            if not isinstance(data, list):
                raise DataError(f"{path}: a .json source must hold a list of rows")
            yield from data
            return
        for line in fh:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield BAD_JSON


def _hub_rows(source: str) -> Iterator[Any]:
    spec = source[len(HUB_PREFIX):]
    spec, _, split = spec.partition("@")
    name, _, data_dir = spec.partition(":")
    try:
        import datasets  # optional: only hub sources need it
    except ImportError as exc:
        raise DataError(
            f"{source}: hub sources need the 'datasets' library (pip install datasets), "
            "or pass a local .jsonl[.gz] file"
        ) from exc
    try:
        ds = datasets.load_dataset(name, data_dir=data_dir or None, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - network, auth, missing dataset: all unusable
        raise DataError(f"{source}: could not load from the hub ({type(exc).__name__}: {exc})") from exc
    yield from ds


def load_preferences(source: str | Path) -> tuple[list[PreferencePair], LoadReport]:
    """Load one source (file path or ``hub:`` name); bad rows are counted, not fatal."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        rows: Iterable[Any] = _hub_rows(text)
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise DataError(f"preference data {text!r}: no such file")
        rows = _read_file(path)
    try:
        pairs, report = parse_rows(rows, text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, EOFError) as exc:
        raise DataError(f"preference data {text!r}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not pairs:
        raise DataError(f"preference data {text!r}: no valid pairs ({report.summary()})")
    return pairs, report


def load_many(sources: Sequence[str | Path]) -> tuple[list[PreferencePair], LoadReport]:
    """Load and concatenate several sources; each must yield pairs on its own."""
    if not sources:
        raise DataError("no preference data given")
    pairs: list[PreferencePair] = []
    report = LoadReport()
    for src in sources:
        got, rep = load_preferences(src)
        pairs += got
        report = report.merge(rep)
    return pairs, report


# -- splits --------------------------------------------------------------------------------
def prompt_unit(prompt: str, seed: int = 0) -> float:
    """A uniform number in [0, 1) that depends only on (seed, prompt)."""
    digest = hashlib.sha256(f"{seed}:{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(prompt: str, heldout_fraction: float = 0.2, seed: int = 0) -> str:
    """Which of :data:`SPLITS` a prompt belongs to: a half for reward models, a half for
    alignment, the first ``heldout_fraction`` of each half held out."""
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    u = prompt_unit(prompt, seed)
    if u < 0.5:
        return "rm_heldout" if u < 0.5 * heldout_fraction else "rm_train"
    return "align_heldout" if u < 0.5 + 0.5 * heldout_fraction else "align_train"


def split_pairs(
    pairs: Iterable[PreferencePair], heldout_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[PreferencePair]]:
    """Group pairs by the split of their prompt; every split is present (maybe empty)."""
    out: dict[str, list[PreferencePair]] = {name: [] for name in SPLITS}
    for pair in pairs:
        out[split_of(pair.prompt, heldout_fraction, seed)].append(pair)
    return out


# -- batching ------------------------------------------------------------------------------
def length_batches(
    lengths: Sequence[int], batch_size: int, seed: int | None = 0, max_tokens: int | None = None
) -> list[list[int]]:
    """Indices grouped into batches of similar length, so padding wastes little compute.

    Sort by length, cut into chunks of at most ``batch_size`` items and, when ``max_tokens``
    is given, at most that many padded tokens (items × longest; an item longer than the
    budget gets a batch of its own); then shuffle the chunks with ``seed`` (``None`` keeps
    them in length order, for evaluation).  Equal lengths are tie-broken by a seeded shuffle
    so the same items do not always batch together.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if seed is not None:
        rng.shuffle(order)  # random tie-break: the sort below is stable
    order.sort(key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # ascending order: the newcomer is the longest, so it sets the padded width
        over = max_tokens is not None and (len(current) + 1) * lengths[i] > max_tokens
        if current and (len(current) == batch_size or over):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    if seed is not None:
        rng.shuffle(batches)
    return batches
