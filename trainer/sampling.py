"""Batched sampling from a causal-LM policy: the SFT samples that references are fitted on.

A prompt (HH transcript or chat messages) is rendered with the policy's chat template when it
has one (else left as the HH transcript, the model continuing after "Assistant:"); prompts
longer than the context minus ``max_new_tokens`` lose tokens from the left, and are counted.
Generation stops at the end of the assistant turn: the EOS / end-of-turn token, or, for
plain-text policies, the next "\\n\\nHuman:" marker.

Several samples of one prompt share its prefill: the prompt is run once, its KV cache copied
into a static cache for the whole group, and only the new tokens are decoded (on this 2-core
CPU, 64 samples × 32 new tokens of SmolLM2-135M take 8 s instead of 22 s).  Single samples of
many prompts are batched across prompts with left padding instead.  The random seed of a group
is derived from (seed, prompt, group index), so a prompt's samples do not depend on which other
prompts share the run, and an interrupted run resumed later draws exactly the same samples.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from service.formatting import Prompt, prompt_as_messages, prompt_as_text

STOP_MARKERS = ("\n\nHuman:", "\n\nAssistant:")
SHARED_PREFILL_MIN = 2  # samples per prompt from which the prompt's prefill is shared
log = logging.getLogger(__name__)


def default_dtype(device: str) -> str:
    """bf16 on GPUs and on CPUs with native bf16 matmuls (AVX-512 BF16 / AMX), else fp32."""
    if device.startswith("cuda"):
        return "bfloat16"
    from service.backends.modeling import cpu_has_native_bf16

    return "bfloat16" if cpu_has_native_bf16() else "float32"


def clean_text(text: str) -> tuple[str, bool]:
    """A sample cut at the first turn marker a plain-text policy invents; whether one was found."""
    for marker in STOP_MARKERS:
        at = text.find(marker)
        if at >= 0:
            return text[:at].strip(), True
    return text.strip(), False


def _group_seed(seed: int, prompt: Prompt, group: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{prompt_as_text(prompt)}\0{group}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass
class SamplingArgs:
    temperature: float = 1.0
    """softmax temperature (> 0)"""
    top_p: float = 1.0
    """nucleus sampling mass"""
    top_k: int = 50
    """keep the k most likely tokens (50: transformers' default decoding; 0: the full distribution)"""
    max_new_tokens: int = 128
    """tokens generated per sample at most"""
    batch_size: int = 16
    """sequences per generate call"""
    seed: int = 0
    """seed of the whole call: same prompts, args and seed give the same samples"""


@dataclass
class Sample:
    text: str
    tokens: int
    finished: bool  # stopped at the end of its turn, not at max_new_tokens


@dataclass
class SamplingStats:
    prompts: int = 0
    samples: int = 0
    prompt_truncated: int = 0  # prompts cut from the left to fit the context
    empty: int = 0  # samples with no text after stripping
    unfinished: int = 0  # samples that hit max_new_tokens
    seconds: float = 0.0

    def merge(self, other: "SamplingStats") -> None:
        for name in ("prompts", "samples", "prompt_truncated", "empty", "unfinished", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class PromptEncoder:
    """Prompt → policy token ids (chat template when the tokenizer has one), and the stop tokens."""

    def __init__(self, tokenizer: Any, context: int) -> None:
        self.tokenizer = tokenizer
        self.context = context
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.stop_ids = self._stop_token_ids()

    def _stop_token_ids(self) -> list[int]:
        tok = self.tokenizer
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        for name in ("<|im_end|>", "<|end|>", "<|eot_id|>", "<end_of_turn>"):
            tid = tok.convert_tokens_to_ids(name) if name in tok.get_vocab() else None
            if tid is not None:
                ids.add(tid)
        return sorted(ids)

    def encode_prompt(self, prompt: Prompt, max_new_tokens: int) -> tuple[list[int], int]:
        """Token ids of the rendered prompt, and how many tokens were cut from its left."""
        if self.chat:
            text = self.tokenizer.apply_chat_template(prompt_as_messages(prompt), add_generation_prompt=True, tokenize=False)
        else:
            text = prompt_as_text(prompt)
        ids = self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"]
        room = self.context - max_new_tokens
        if room < 8:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in {self.context} tokens")
        cut = max(0, len(ids) - room)
        return ids[cut:], cut


def context_length(config: Any) -> int:
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)


class Sampler:
    def __init__(self, path: str | Path, device: str = "cpu", dtype: str = "auto") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from service.modelpath import resolve_model_path

        resolved = resolve_model_path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(resolved)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # masked out; only fills the left
        self.dtype = default_dtype(device) if dtype == "auto" else dtype
        model: Any = AutoModelForCausalLM.from_pretrained(resolved, dtype=getattr(torch, self.dtype))
        self.model = model.to(device).eval()
        self.device = device
        self.encoder = PromptEncoder(self.tokenizer, context_length(self.model.config))
        self.chat = self.encoder.chat
        self.context = self.encoder.context
        self._stop_ids = self.encoder.stop_ids
        self.shared_prefill = True

    def encode_prompt(self, prompt: Prompt, max_new_tokens: int) -> tuple[list[int], int]:
        return self.encoder.encode_prompt(prompt, max_new_tokens)

    def sample(
        self, prompts: Sequence[Prompt], n: int, args: SamplingArgs, progress: bool = True
    ) -> tuple[list[list[Sample]], SamplingStats]:
        """``n`` samples per prompt, in prompt order."""
        out: list[list[Sample]] = [[] for _ in prompts]
        stats = SamplingStats()
        for i, samples, one in self.iter_samples(prompts, n, args, progress):
            out[i] = samples
            stats.merge(one)
        return out, stats

    def iter_samples(
        self, prompts: Sequence[Prompt], n: int, args: SamplingArgs, progress: bool = True
    ) -> Iterator[tuple[int, list[Sample], SamplingStats]]:
        """Yield (prompt index, its ``n`` samples, their stats) prompt by prompt, as they finish."""
        if n >= SHARED_PREFILL_MIN:
            yield from self._iter_shared(prompts, n, args, progress)
            return
        samples, stats = self._sample_padded(prompts, n, args, progress)
        for i, s in enumerate(samples):
            yield i, s, stats if i == 0 else SamplingStats()

    def _iter_shared(
        self, prompts: Sequence[Prompt], n: int, args: SamplingArgs, progress: bool
    ) -> Iterator[tuple[int, list[Sample], SamplingStats]]:
        import time

        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts) * n, desc="sampling", unit="sample", disable=not progress)
        for i, prompt in enumerate(prompts):
            started = time.perf_counter()
            stats = SamplingStats(prompts=1, samples=n)
            ids, cut = self.encode_prompt(prompt, args.max_new_tokens)
            stats.prompt_truncated = int(cut > 0)
            samples: list[Sample] = []
            for group, start in enumerate(range(0, n, args.batch_size)):
                size = min(args.batch_size, n - start)
                rows = self._generate_shared(ids, size, args, _group_seed(args.seed, prompt, group))
                samples.extend(self._decoded(rows, stats))
                bar.update(size)
            stats.seconds = round(time.perf_counter() - started, 2)
            yield i, samples, stats
        bar.close()

    def _generate_shared(self, ids: list[int], size: int, args: SamplingArgs, seed: int) -> list[list[int]]:
        """``size`` continuations of one prompt; the prompt's prefill is computed once."""
        import torch

        input_ids = torch.tensor([ids] * size, device=self.device)  # (B, T)
        shared = self.shared_prefill and len(ids) >= 2  # a one-token prompt has no prefix to share
        cache = self._shared_prefix_cache(ids, size, args.max_new_tokens) if shared else None
        torch.manual_seed(seed)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # `past_key_values` is named `cache` in newer releases
            gen = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache,
                do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                max_new_tokens=args.max_new_tokens, eos_token_id=self._stop_ids, pad_token_id=self.tokenizer.pad_token_id,
            )[:, len(ids):]  # (B, new)
        return list(gen.tolist())

    def _shared_prefix_cache(self, ids: list[int], size: int, max_new_tokens: int) -> Any:
        """A static KV cache holding all but the last prompt token, copied ``size`` times."""
        import torch

        try:
            from transformers import DynamicCache, StaticCache

            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                prefix = DynamicCache(config=self.model.config)
                self.model(torch.tensor([ids[:-1]], device=self.device), past_key_values=prefix, use_cache=True)
                cache = StaticCache(config=self.model.config, max_cache_len=len(ids) + max_new_tokens)
                for layer, kv in enumerate(prefix.layers):
                    keys, values = getattr(kv, "keys"), getattr(kv, "values")  # (1, heads, T, d) each
                    cache.update(keys.expand(size, -1, -1, -1).contiguous(),
                                 values.expand(size, -1, -1, -1).contiguous(), layer)
            return cache
        except Exception as exc:  # an architecture or transformers release without this cache API
            log.warning("shared prefill unavailable (%s: %s); prompts are prefilled per sample",
                        type(exc).__name__, exc)
            self.shared_prefill = False
            return None

    def _decoded(self, rows: list[list[int]], stats: SamplingStats) -> list[Sample]:
        out = []
        for row in rows:
            ended = any(t in self._stop_ids for t in row)
            if ended:
                row = row[: next(k for k, t in enumerate(row) if t in self._stop_ids)]
            text, marked = clean_text(str(self.tokenizer.decode(row, skip_special_tokens=True)))
            sample = Sample(text=text, tokens=len(row), finished=ended or marked)
            stats.empty += not text
            stats.unfinished += not sample.finished
            out.append(sample)
        return out

    def _sample_padded(
        self, prompts: Sequence[Prompt], n: int, args: SamplingArgs, progress: bool
    ) -> tuple[list[list[Sample]], SamplingStats]:
        """Few samples of many prompts: batched across prompts with left padding."""
        import time

        import torch
        from tqdm.auto import tqdm

        started = time.perf_counter()
        stats = SamplingStats(prompts=len(prompts))
        encoded = []
        for p in prompts:
            ids, cut = self.encode_prompt(p, args.max_new_tokens)
            encoded.append(ids)
            stats.prompt_truncated += cut > 0
        jobs = [(i, encoded[i]) for i in range(len(prompts)) for _ in range(n)]
        out: list[list[Sample]] = [[] for _ in prompts]
        generator_seed = args.seed
        bar = tqdm(total=len(jobs), desc="sampling", unit="sample", disable=not progress)
        for batch in _chunks(jobs, args.batch_size):
            width = max(len(ids) for _, ids in batch)
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in batch], device=self.device)  # (B, T)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in batch], device=self.device)  # (B, T)
            torch.manual_seed(generator_seed)
            generator_seed += 1
            with torch.inference_mode():
                gen = self.model.generate(
                    input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens, eos_token_id=self._stop_ids,
                    pad_token_id=pad,
                )[:, width:]  # (B, new)
            for (i, _), sample in zip(batch, self._decoded(gen.tolist(), stats)):
                out[i].append(sample)
            bar.update(len(batch))
        bar.close()
        stats.samples = len(jobs)
        stats.seconds = round(time.perf_counter() - started, 2)
        return out, stats


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
