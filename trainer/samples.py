"""Sample banks: SFT samples per prompt in one JSONL file, written as they come, scored on demand.

One line per prompt::

    {"prompt": "...", "samples": ["...", ...], "tokens": [int, ...], "finished": [bool, ...],
     "empty": int, "policy": "...", "seed": int, "max_new_tokens": int,
     "rewards": {"helpful": [float, ...], ...}}

``samples`` holds the non-empty samples only (``empty`` counts the rest).  ``rewards`` holds the
raw reward of every sample under every model scored so far, in sample order.  The same bank
feeds ``fit-reference`` (training prompts), the calibration report and the best-of-k
experiment (held-out prompts), so the policy is sampled once per prompt however many
experiments use it.

Writing is append-only while sampling (a crash loses at most the prompt in flight), and a
rerun skips the prompts already in the bank: interrupted runs resume where they stopped, and
draw the same samples they would have (seeds are per prompt, see :mod:`trainer.sampling`).
Scoring rewrites the file atomically (temp file + rename) once the missing models are scored.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from service.formatting import Prompt

SCORE_CHUNK_PROMPTS = 16  # prompts per scoring request group
log = logging.getLogger(__name__)


def select_prompts(data: Sequence[str], split: str, limit: int | None, heldout_fraction: float = 0.2,
                   split_seed: int = 0) -> list[str]:
    """Distinct prompts of one split, in a fixed pseudo-random order (a prefix is a fair mix of
    the sources, e.g. helpful and harmless), at most ``limit`` of them.  ``split_seed`` and
    ``heldout_fraction`` must be those the reward models were trained with (0 and 0.2 for the
    defaults), or held-out prompts leak into training."""
    from trainer.data import load_many, split_pairs

    pairs, _ = load_many(data)
    prompts = list(dict.fromkeys(p.prompt for p in split_pairs(pairs, heldout_fraction, split_seed)[split]))
    prompts.sort(key=lambda p: hashlib.sha256(f"order\0{split_seed}\0{p}".encode()).digest())
    return prompts[:limit] if limit else prompts


def read_bank(path: str | Path) -> list[dict[str, Any]]:
    """One record per prompt in first-seen order, the latest line winning (a prompt resampled
    with a larger K is appended again); a torn last line (a crash mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records: dict[str, dict[str, Any]] = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not JSON") from None
        records[record["prompt"]] = record
    return list(records.values())


def write_bank(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def fill_bank(path: str | Path, prompts: Sequence[Prompt], make_sampler: Callable[[], Any], k: int, args: Any,
              policy: str = "", progress: bool = True) -> dict[str, int]:
    """Sample ``k`` per prompt for every prompt not yet in the bank, appending as they finish.
    ``make_sampler`` is called (the policy loaded) only if some prompt is missing.

    Returns counts: prompts already present, sampled now, truncated prompts, empty samples."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = read_bank(path)
    have = {r["prompt"] for r in existing if len(r["samples"]) + r.get("empty", 0) >= k}
    wanted = {_key(p) for p in prompts}
    other = sorted({(r.get("max_new_tokens"), r.get("top_k", 50), r.get("temperature", 1.0)) for r in existing
                    if r["prompt"] in wanted} - {(args.max_new_tokens, args.top_k, args.temperature)}, key=str)
    if other:
        log.warning("%s holds samples drawn with other settings (max_new_tokens, top_k, temperature) %s than "
                    "asked for %s; they are reused as they are", path, other,
                    (args.max_new_tokens, args.top_k, args.temperature))
    todo = [p for p in prompts if _key(p) not in have]
    counts = {"present": len(prompts) - len(todo), "sampled": 0, "prompt_truncated": 0, "empty": 0}
    if not todo:
        return counts
    repair_tail(path)
    sampler = make_sampler()
    with path.open("a") as sink:
        for i, samples, stats in sampler.iter_samples(todo, k, args, progress=progress):
            kept = [s for s in samples if s.text]
            record = {"prompt": _key(todo[i]), "samples": [s.text for s in kept], "tokens": [s.tokens for s in kept],
                      "finished": [s.finished for s in kept], "empty": len(samples) - len(kept),
                      "policy": policy, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
                      "top_k": args.top_k, "temperature": args.temperature, "rewards": {}}
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            counts["sampled"] += 1
            counts["prompt_truncated"] += stats.prompt_truncated
            counts["empty"] += record["empty"]
    return counts


def score_bank(path: str | Path, client: Any, models: Sequence[str], progress: bool = True) -> int:
    """Score every sample of the bank under every model in ``models`` it lacks (raw rewards,
    through the service); returns how many records were scored.  Progress is saved every
    :data:`SCORE_CHUNK_PROMPTS` prompts, so an interruption keeps what was scored."""
    from tqdm.auto import tqdm

    records = read_bank(path)
    todo = [r for r in records if r["samples"] and any(m not in r.get("rewards", {}) for m in models)]
    bar = tqdm(total=sum(len(r["samples"]) for r in todo), desc="scoring", unit="sample", disable=not progress)
    for start in range(0, len(todo), SCORE_CHUNK_PROMPTS):
        group = todo[start : start + SCORE_CHUNK_PROMPTS]
        missing = sorted({m for r in group for m in models if m not in r.get("rewards", {})})
        pairs = [(r["prompt"], s) for r in group for s in r["samples"]]
        results = client.score(pairs, models=missing, allow_truncation=True)
        at = 0
        for r in group:
            n = len(r["samples"])
            rewards = r.setdefault("rewards", {})
            for m in missing:
                rewards.setdefault(m, [res.rewards[m] for res in results[at : at + n]])
            at += n
        write_bank(path, records)
        bar.update(len(pairs))
    bar.close()
    return len(todo)


def _key(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    from service.formatting import prompt_as_text

    return prompt_as_text(prompt)


def repair_tail(path: Path) -> None:
    """Drop a torn last line so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with path.open("r+b") as f:
        f.truncate(cut)


# -- logand sample -------------------------------------------------------------------------
def add_sampling_arguments(p: argparse.ArgumentParser, k: int, max_new_tokens: int = 128,
                           data_required: bool = True) -> None:
    a = p.add_argument
    a("--policy", required=True, help="causal-LM directory or pkg:/hub reference (the SFT policy)")
    a("--data", action="append", required=data_required, help="preference file(s) whose prompts are used")
    a("--heldout-fraction", type=float, default=0.2, help="as the reward models were trained with")
    a("--split-seed", type=int, default=0, help="seed of the prompt split, as the reward models were trained with")
    a("--prompts", type=int, default=None, help="use at most this many prompts of the split")
    a("--k", type=int, default=k, help="samples per prompt")
    a("--temperature", type=float, default=1.0)
    a("--top-p", type=float, default=1.0)
    a("--top-k", type=int, default=50, help="keep the k most likely tokens (50: transformers' default; 0: all)")
    a("--max-new-tokens", type=int, default=max_new_tokens)
    a("--batch-size", type=int, default=64, help="sequences decoded together")
    a("--dtype", default="auto", help="policy dtype: auto (bf16 where the hardware has it), float32, bfloat16")
    a("--device", default="cpu")
    a("--seed", type=int, default=0)


def add_service_arguments(p: argparse.ArgumentParser, default: str | None = "http://127.0.0.1:8000") -> None:
    a = p.add_argument
    a("--service", default=default, help="URL of the logand service, or 'local' to start one for this command"
      + ("" if default else " (default: no scoring)"))
    a("--service-config", default=None, help="config of the service started by --service local (default: embedded)")
    a("--api-key", default=None, help="service API key")


@contextlib.contextmanager
def reward_client(ns: argparse.Namespace) -> Iterator[Any]:
    """A client of ``ns.service`` (started here for ``local``), with retries generous enough to
    wait out a service restart: the caller never loses or duplicates work to one."""
    from clients.client import RewardClient
    from clients.local import service_url

    with service_url(ns.service, ns.service_config, ns.api_key) as url, \
            RewardClient(url, api_key=ns.api_key, max_retries=10) as client:
        yield client


def sampling_args(ns: argparse.Namespace) -> Any:
    from trainer.sampling import SamplingArgs

    return SamplingArgs(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, max_new_tokens=ns.max_new_tokens,
                        batch_size=ns.batch_size, seed=ns.seed)


def run_sample(ns: argparse.Namespace) -> int:
    import time

    from trainer.sampling import Sampler

    started = time.perf_counter()
    prompts = select_prompts(ns.data, ns.split, ns.prompts, ns.heldout_fraction, ns.split_seed)
    if not prompts:
        raise SystemExit(f"no prompts in split {ns.split} of {ns.data}")
    counts = fill_bank(ns.out, prompts, lambda: Sampler(ns.policy, device=ns.device, dtype=ns.dtype), ns.k,
                       sampling_args(ns), policy=str(ns.policy))
    print(f"{ns.out}: {counts['present']} prompts already there, {counts['sampled']} sampled × K={ns.k} "
          f"({counts['prompt_truncated']} prompts cut from the left, {counts['empty']} empty samples dropped) "
          f"in {time.perf_counter() - started:.1f} s")
    if ns.service:
        with reward_client(ns) as client:
            models = ns.models or client.models()["default_models"]
            scored = score_bank(ns.out, client, models)
        print(f"scored {scored} prompts under {', '.join(models)}")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sample", help="sample K responses per prompt from a policy into a sample bank",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(p, k=16)
    p.add_argument("--split", default="align_heldout", help="prompt split (rm_train, rm_heldout, align_train, align_heldout)")
    p.add_argument("--out", required=True, help="the bank (JSONL); an existing bank is extended, not overwritten")
    add_service_arguments(p, default=None)
    p.add_argument("--models", nargs="*", default=None, help="models to score (default: the service's defaults)")
    p.set_defaults(func=run_sample)
    return p
