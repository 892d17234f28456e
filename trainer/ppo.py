"""``logand ppo``: PPO of a causal-LM policy against rewards served over HTTP.

Reads top to bottom, CleanRL-style: arguments → model pieces → rollout → scoring → advantages
→ the update → checkpoints → the loop.  One step:

1. take ``batch_size`` prompts; sample one response each from the current policy;
2. score every (prompt, response) through the logand service with ``method`` (``raw``,
   ``transformed``, ``weighted_sum``, ``log_sigmoid_sum``) — the utility u lands on the last
   response token;
3. per token, the KL penalty −γ·(log π(y_t) − log π_SFT(y_t)) against the frozen SFT policy
   (with LoRA, the same weights with the adapter switched off: no second copy);
4. GAE advantages (λ, discount), whitened; ``ppo_epochs`` passes of clipped policy and value
   losses over minibatches; gradient-norm clipping.

The objective is E[u] − γ·KL(π ‖ π_SFT).  The paper's Table 2 writes the same thing as a mixture
(1 − α)·E[u] − α·KL with α = γ / (1 + γ); ``--gamma`` takes γ.

Logs: ``metrics.jsonl`` (one line per step), TensorBoard when installed, a progress bar.
Namespaces: ``reward/`` (utility, raw rewards per model, non-score reward), ``objective/``
(KL, entropy), ``losses/`` (policy, value, approx_kl, clipfrac), ``charts/`` (response length,
learning rate) and ``time/`` (generation, scoring, update).

Checkpoints (``checkpoint.pt``, written atomically every ``save_every`` steps and at the end)
hold the trainable weights, value head, optimizer, step and RNG states: ``--resume`` continues
exactly where a run stopped, drawing the same prompts and samples it would have drawn.  A
service that goes away is waited for (``service_wait_s``); no step is taken on missing rewards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.sampling import clean_text

log = logging.getLogger("logand.ppo")


@dataclass
class Args:
    policy: str = field(default="models/smollm2-135m-instruct", metadata={"help": "SFT policy: causal-LM directory, pkg: or hub name"})
    data: list[str] = field(default_factory=list, metadata={"help": "preference file(s) whose prompts are used", "required": True})
    split: str = field(default="align_train", metadata={"help": "prompt split to train on"})
    heldout_fraction: float = field(default=0.2, metadata={"help": "of the prompt split, as the reward models were trained with"})
    split_seed: int = field(default=0, metadata={"help": "seed of the prompt split, as the reward models were trained with"})
    prompts: int | None = field(default=None, metadata={"help": "use at most this many prompts"})
    service: str = field(default="http://127.0.0.1:8000", metadata={"help": "logand service URL ('local': start one)"})
    service_config: str | None = field(default=None, metadata={"help": "config of the service started by --service local"})
    api_key: str | None = field(default=None, metadata={"help": "service API key"})
    models: list[str] = field(default_factory=list, metadata={"help": "reward models (default: the service's defaults)"})
    method: str = field(default="log_sigmoid_sum", metadata={"help": "utility: raw, transformed, weighted_sum, log_sigmoid_sum"})
    gamma: float = field(default=0.05, metadata={"help": "KL weight γ in E[u] − γ·KL (the paper's α = γ/(1+γ))"})
    steps: int = field(default=100, metadata={"help": "PPO steps (one batch of rollouts each)"})
    batch_size: int = field(default=16, metadata={"help": "rollouts (prompts) per step"})
    minibatch_size: int = field(default=8, metadata={"help": "rollouts per gradient step"})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each batch"})
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens per response at most"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (also divides the logits in the loss)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (no top-k: the loss needs the full distribution)"})
    discount: float = field(default=1.0, metadata={"help": "per-token discount of GAE"})
    lam: float = field(default=0.95, metadata={"help": "GAE λ"})
    clip: float = field(default=0.2, metadata={"help": "policy ratio clip ε"})
    value_clip: float = field(default=0.2, metadata={"help": "value clip around the rollout's values"})
    value_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the policy (0: train every weight)"})
    empty_utility: float = field(default=-5.0, metadata={"help": "utility of an empty response (never sent to the service)"})
    dtype: str = field(default="float32", metadata={"help": "policy dtype: float32 or bfloat16"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    seed: int = field(default=0, metadata={"help": "seed of prompts order, sampling and minibatches"})
    save_every: int = field(default=10, metadata={"help": "checkpoint every this many steps"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint.pt when present"})
    service_wait_s: float = field(default=600.0, metadata={"help": "how long to wait for a service that went away"})
    service_retry_s: float = field(default=5.0, metadata={"help": "pause between tries while the service is away"})
    out: str = field(default="runs/ppo", metadata={"help": "output folder"})


# -- model pieces ----------------------------------------------------------------------------------
class ValueHead(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: Tensor) -> Tensor:  # (B, T, H) → (B, T)
        return self.linear(h.float()).squeeze(-1)


def load_policy(args: Args) -> tuple[Any, Any, nn.Module | None]:
    """(policy, tokenizer, frozen reference or None when the reference is the LoRA-disabled policy)."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.modelpath import resolve_model_path

    path = resolve_model_path(args.policy)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    model = model.to(args.device)
    if args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear",
                         task_type="CAUSAL_LM")
        return get_peft_model(model, cfg), tok, None
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    return model, tok, ref


@contextlib.contextmanager
def reference_mode(policy: Any, ref: nn.Module | None) -> Iterator[Any]:
    """The frozen SFT policy: ``ref``, or the LoRA policy with its adapter switched off."""
    if ref is not None:
        yield ref
    else:
        with policy.disable_adapter():
            yield policy


def forward(model: Any, head: ValueHead | None, seq: Tensor, mask: Tensor, width: int, temperature: float
            ) -> tuple[Tensor, Tensor | None, Tensor]:
    """Log-probs (B, R) of the response tokens seq[:, width:], values (B, R), logits (B, R, V)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens
    out = model(input_ids=seq, attention_mask=mask, position_ids=positions, output_hidden_states=head is not None)
    logits = out.logits[:, width - 1 : -1].float() / temperature  # (B, R, V): position t predicts token t+1
    logprobs = torch.gather(F.log_softmax(logits, -1), 2, seq[:, width:, None]).squeeze(-1)  # (B, R)
    values = head(out.hidden_states[-1][:, width - 1 : -1]) if head is not None else None  # (B, R)
    return logprobs, values, logits


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: Tensor, mask: Tensor) -> Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


# -- rollout -----------------------------------------------------------------------------------------
@dataclass
class Rollout:
    seq: Tensor  # (B, P+R) prompt (left-padded) + response
    mask: Tensor  # (B, P+R) attention mask
    width: int  # P
    response_mask: Tensor  # (B, R): 1 up to and including the first stop token
    texts: list[str]


def rollout(policy: Any, tok: Any, prompt_ids: list[list[int]], stop_ids: list[int], args: Args, seed: int) -> Rollout:
    width = max(len(p) for p in prompt_ids)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=args.device)  # (B, P)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=args.device)  # (B, P)
    torch.manual_seed(seed)
    with torch.no_grad():
        # top_k=0: the full distribution, the one the log-probs of the loss and the KL are taken under
        seq = policy.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=args.temperature,
                              top_p=args.top_p, top_k=0, max_new_tokens=args.max_new_tokens, eos_token_id=stop_ids,
                              pad_token_id=pad)  # (B, P+R)
    resp = seq[:, width:]  # (B, R)
    is_stop = torch.isin(resp, torch.tensor(stop_ids, device=resp.device))
    after_stop = (is_stop.cumsum(-1) - is_stop.long()) > 0  # tokens after the first stop token
    response_mask = (~after_stop).float()  # (B, R)
    mask = torch.cat([attn, response_mask.long()], dim=1)
    texts = []
    for row, m in zip(resp.tolist(), response_mask.tolist()):
        kept = [t for t, keep in zip(row, m) if keep and t not in stop_ids]
        texts.append(clean_text(str(tok.decode(kept, skip_special_tokens=True)))[0])
    return Rollout(seq, mask, width, response_mask, texts)


# -- scoring -----------------------------------------------------------------------------------------
def score(client: Any, prompts: Sequence[Any], texts: Sequence[str], args: Args) -> tuple[list[float], dict[str, list[float]]]:
    """Utility per rollout and raw rewards per model, waiting out an absent service (no step
    is taken without every reward)."""
    from clients.client import ServiceUnavailable

    todo = [i for i, t in enumerate(texts) if t]
    deadline = time.monotonic() + args.service_wait_s
    while True:
        try:
            results = client.score([(prompts[i], texts[i]) for i in todo], models=args.models or None,
                                   method=args.method, allow_truncation=True) if todo else []
            break
        except ServiceUnavailable as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("service unavailable (%s); waiting", exc)
            time.sleep(args.service_retry_s)
    utilities = [args.empty_utility] * len(texts)
    raw: dict[str, list[float]] = {}
    for i, r in zip(todo, results):
        utilities[i] = r.utility
        for m, v in r.rewards.items():
            raw.setdefault(m, []).append(v)
    return utilities, raw


# -- advantages ----------------------------------------------------------------------------------------
def gae(rewards: Tensor, values: Tensor, mask: Tensor, discount: float, lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns (B, R) over the masked response tokens."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + discount * next_v - values[:, t]
        last = (delta + discount * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


# -- checkpoints -------------------------------------------------------------------------------------
def trainable_state(policy: Any) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in policy.named_parameters() if v.requires_grad}


def save_checkpoint(path: Path, step: int, policy: Any, head: ValueHead, opt: torch.optim.Optimizer) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "policy": trainable_state(policy), "value_head": head.state_dict(),
                "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(), "numpy_rng": _numpy_rng_state()}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, policy: Any, head: ValueHead, opt: torch.optim.Optimizer) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only: no pickle
    missing = policy.load_state_dict(state["policy"], strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"{path}: checkpoint does not match the policy ({missing.unexpected_keys[:3]} …)")
    head.load_state_dict(state["value_head"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    n = state["numpy_rng"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    return int(state["step"])


def _numpy_rng_state() -> dict[str, Any]:
    """NumPy's generator state as a tensor and plain numbers, so a checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert kind == "MT19937" and isinstance(keys, np.ndarray)
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}


def export_policy(policy: Any, tok: Any, out: Path) -> None:
    """What ``logand evaluate`` and samplers load: a LoRA adapter dir or a full model dir."""
    policy.save_pretrained(out)
    tok.save_pretrained(out)


# -- the loop ----------------------------------------------------------------------------------------
def prompts_for_step(prompts: Sequence[str], step: int, batch: int, seed: int) -> list[str]:
    """A fixed, reshuffled-every-epoch order: the same step always sees the same prompts."""
    per_epoch = max(1, len(prompts) // batch)
    epoch, k = divmod(step, per_epoch)
    order = list(range(len(prompts)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [prompts[i] for i in order[k * batch : (k + 1) * batch]]


def train(args: Args) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from trainer.sampling import PromptEncoder, context_length
    from trainer.samples import reward_client, select_prompts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(asdict(args), indent=1) + "\n")
    prompts = select_prompts(args.data, args.split, args.prompts, args.heldout_fraction, args.split_seed)
    if len(prompts) < args.batch_size:
        raise SystemExit(f"{len(prompts)} prompts in split {args.split}: fewer than one batch ({args.batch_size})")
    torch.manual_seed(args.seed)
    policy, tok, ref = load_policy(args)
    encoder = PromptEncoder(tok, context_length(policy.config))
    hidden = policy.config.hidden_size if hasattr(policy.config, "hidden_size") else policy.config.n_embd
    head = ValueHead(hidden).to(args.device)
    params = [p for p in policy.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.Adam(params, lr=args.lr, eps=1e-5)
    step = 0
    ckpt = out / "checkpoint.pt"
    metrics_path = out / "metrics.jsonl"
    if args.resume and ckpt.exists():
        step = load_checkpoint(ckpt, policy, head, opt)
        print(f"resumed from {ckpt} at step {step}")
        # steps logged after the checkpoint are redone: drop their lines so none is repeated
        kept = [x for x in metrics_path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step] \
            if metrics_path.exists() else []
        metrics_path.write_text("".join(x + "\n" for x in kept))
    else:
        metrics_path.write_text("")  # a fresh run in this folder starts a fresh log
    writer = _tensorboard(out)
    history: list[dict[str, float]] = []
    with reward_client(args) as client, metrics_path.open("a") as metrics_log:  # type: ignore[arg-type]
        bar = tqdm(total=args.steps, initial=step, desc="ppo", unit="step")
        while step < args.steps:
            batch_prompts = prompts_for_step(prompts, step, args.batch_size, args.seed)
            t0 = time.perf_counter()
            policy.eval()
            ro = rollout(policy, tok, [encoder.encode_prompt(p, args.max_new_tokens)[0] for p in batch_prompts],
                         encoder.stop_ids, args, seed=args.seed * 7919 + step)
            t1 = time.perf_counter()
            utilities, raw = score(client, batch_prompts, ro.texts, args)
            t2 = time.perf_counter()
            metrics = update(policy, ref, head, opt, ro, torch.tensor(utilities, device=args.device), args, step)
            t3 = time.perf_counter()
            step += 1
            metrics.update({"step": step, "reward/utility": float(np.mean(utilities)),
                            **{f"reward/raw_{m}": float(np.mean(v)) for m, v in raw.items()},
                            "charts/empty_responses": float(sum(not t for t in ro.texts)),
                            "time/generation": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2})
            metrics_log.write(json.dumps(metrics) + "\n")
            metrics_log.flush()
            history.append(metrics)
            if writer is not None:
                for k, v in metrics.items():
                    if k != "step":
                        writer.add_scalar(k, v, step)
            bar.set_postfix(u=f"{metrics['reward/utility']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
            bar.update(1)
            if step % args.save_every == 0 or step == args.steps:
                save_checkpoint(ckpt, step, policy, head, opt)
        bar.close()
    export_policy(policy, tok, out / "policy")
    if writer is not None:
        writer.close()
    return {"steps": step, "history": history, "policy": out / "policy"}


def update(policy: Any, ref: nn.Module | None, head: ValueHead, opt: torch.optim.Optimizer, ro: Rollout,
           utilities: Tensor, args: Args, step: int) -> dict[str, float]:
    """Rewards with the KL penalty, GAE, then ``ppo_epochs`` passes of clipped PPO."""
    mask = ro.response_mask  # (B, R)
    with torch.no_grad():
        old_logp, old_values, logits = forward(policy, head, ro.seq, ro.mask, ro.width, args.temperature)
        entropy = masked_mean(torch.distributions.Categorical(logits=logits).entropy(), mask)
        del logits
        with reference_mode(policy, ref) as reference:
            ref_logp, _, _ = forward(reference, None, ro.seq, ro.mask, ro.width, args.temperature)
        kl = (old_logp - ref_logp) * mask  # (B, R): sampled per-token KL estimate
        rewards = -args.gamma * kl
        last = (mask.sum(-1).long() - 1).clamp(min=0)  # index of each response's last token
        rewards[torch.arange(len(last)), last] += utilities
        assert old_values is not None
        adv, returns = gae(rewards, old_values, mask, args.discount, args.lam)
        adv = whiten(adv, mask)
    # dropout stays off (eval mode): the PPO ratio must compare the same function
    stats: dict[str, list[float]] = {"pg": [], "vf": [], "approx_kl": [], "clipfrac": []}
    gen = torch.Generator().manual_seed(args.seed * 104_729 + step)
    n = ro.seq.shape[0]
    for _ in range(args.ppo_epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, args.minibatch_size):
            idx = order[start : start + args.minibatch_size]
            m = mask[idx]
            logp, values, _ = forward(policy, head, ro.seq[idx], ro.mask[idx], ro.width, args.temperature)
            assert values is not None
            ratio = torch.exp(logp - old_logp[idx])
            pg = masked_mean(torch.max(-adv[idx] * ratio, -adv[idx] * ratio.clamp(1 - args.clip, 1 + args.clip)), m)
            v_clipped = old_values[idx] + (values - old_values[idx]).clamp(-args.value_clip, args.value_clip)
            vf = 0.5 * masked_mean(torch.max((values - returns[idx]) ** 2, (v_clipped - returns[idx]) ** 2), m)
            loss = pg + args.value_coef * vf
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], args.max_grad_norm)
            opt.step()
            with torch.no_grad():
                stats["pg"].append(float(pg))
                stats["vf"].append(float(vf))
                stats["approx_kl"].append(float(masked_mean(0.5 * (logp - old_logp[idx]) ** 2, m)))
                stats["clipfrac"].append(float(masked_mean(((ratio - 1).abs() > args.clip).float(), m)))
    return {"objective/kl": float(kl.sum(-1).mean()), "objective/entropy": float(entropy),
            "reward/non_score": float(rewards.sum(-1).mean() - utilities.mean()),
            "losses/policy": float(np.mean(stats["pg"])), "losses/value": float(np.mean(stats["vf"])),
            "losses/approx_kl": float(np.mean(stats["approx_kl"])), "losses/clipfrac": float(np.mean(stats["clipfrac"])),
            "charts/response_length": float(mask.sum(-1).mean()), "charts/lr": args.lr}


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(out / "tensorboard"))


# -- CLI ------------------------------------------------------------------------------------------------
def args_from_namespace(ns: argparse.Namespace) -> Args:
    names = set(Args.__dataclass_fields__)
    return Args(**{k: v for k, v in vars(ns).items() if k in names})


def main(ns: argparse.Namespace) -> int:
    args = args_from_namespace(ns)
    result = train(args)
    last = result["history"][-1] if result["history"] else {}
    print(f"{args.out}: {result['steps']} steps; last utility {last.get('reward/utility', float('nan')):.4f}, "
          f"KL {last.get('objective/kl', float('nan')):.4f}; policy → {result['policy']}")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    from trainer.train_rm import add_dataclass_arguments

    p = subparsers.add_parser("ppo", help="PPO of a policy against the service's utilities",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(p, Args)
    p.set_defaults(func=main)
    return p


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m trainer.ppo", description=__doc__)
    from trainer.train_rm import add_dataclass_arguments

    add_dataclass_arguments(parser, Args)
    sys.exit(main(parser.parse_args()))
