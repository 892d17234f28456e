"""Batched sampling from a causal-LM policy: the SFT samples that references are fitted on.

A prompt (HH transcript or chat messages) is rendered with the policy's chat template when it
has one (else left as the HH transcript, the model continuing after "Assistant:"); prompts
longer than the context minus ``max_new_tokens`` lose tokens from the left, and are counted.
Generation stops at the end of the assistant turn: the EOS / end-of-turn token, or, for
plain-text policies, the next "\\n\\nHuman:" marker.  Left padding, one seed per call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from service.formatting import Prompt, prompt_as_messages, prompt_as_text

STOP_MARKERS = ("\n\nHuman:", "\n\nAssistant:")


@dataclass
class SamplingArgs:
    temperature: float = 1.0
    """softmax temperature (> 0)"""
    top_p: float = 1.0
    """nucleus sampling mass"""
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
    extra: dict[str, Any] = field(default_factory=dict)


class Sampler:
    def __init__(self, path: str | Path, device: str = "cpu", dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from service.modelpath import resolve_model_path

        resolved = resolve_model_path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(resolved)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # masked out; only fills the left
        model: Any = AutoModelForCausalLM.from_pretrained(resolved, dtype=getattr(torch, dtype))
        self.model = model.to(device).eval()
        self.device = device
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        cfg = self.model.config
        limit: int = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        self.context = limit
        self._stop_ids = self._stop_token_ids()

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

    def _clean(self, text: str) -> tuple[str, bool]:
        for marker in STOP_MARKERS:
            at = text.find(marker)
            if at >= 0:
                return text[:at].strip(), True
        return text.strip(), False

    def sample(
        self, prompts: Sequence[Prompt], n: int, args: SamplingArgs, progress: bool = True
    ) -> tuple[list[list[Sample]], SamplingStats]:
        """``n`` samples per prompt, in prompt order."""
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
                    top_p=args.top_p, max_new_tokens=args.max_new_tokens, eos_token_id=self._stop_ids,
                    pad_token_id=pad,
                )[:, width:]  # (B, new)
            for (i, _), row in zip(batch, gen.tolist()):
                ended = any(t in self._stop_ids for t in row)
                if ended:
                    row = row[: next(k for k, t in enumerate(row) if t in self._stop_ids)]
                text, marked = self._clean(str(self.tokenizer.decode(row, skip_special_tokens=True)))
                sample = Sample(text=text, tokens=len(row), finished=ended or marked)
                stats.empty += not text
                stats.unfinished += not sample.finished
                out[i].append(sample)
            bar.update(len(batch))
        bar.close()
        stats.samples = len(jobs)
        stats.seconds = round(time.perf_counter() - started, 2)
        return out, stats


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
