"""
grpo.py: cache-aware GRPO, Eq. 3 of the paper, for the three methods of Table 1 through one code path:

    L^D_GRPO(theta) = E_{y ~ pi^D_theta(.|p)} [ r(y) - beta * KL(pi^D_theta || pi_ref) ]     (Eq. 3; pi^D is Eq. 1)

    --method pte     PTE adapters (pte.py): rollout and replay under the sliding-window cache policy D
    --method lora_c  static LoRA under the same cache policy D (naive cache truncation)
    --method lora    static LoRA with the full cache: --window is ignored (the memory-hungry baseline)

One step, five functions in the order of the algorithm:
    rollout()      G completions per prompt, sampled under D with the current adapters (model.generate)
    score()        r(y) = data.reward(completion, gold): 1.0 for a correct final answer, else 0.0
    advantages()   A_i = (r_i - mean) / (std + 1e-6) within each group of G completions of one prompt
    policy_loss()  the per-token PPO-clipped surrogate (+ k3 KL), the closure pte.replay() calls per segment
    train_step()   replay log-probs with gradients micro-batch by micro-batch, all-reduce, clip, AdamW (adapters)

Run:
    python grpo.py --model Qwen/Qwen2.5-3B-Instruct                                  # one GPU, paper settings
    torchrun --nproc_per_node 8 grpo.py --model Qwen/Qwen2.5-3B-Instruct --method lora_c --out runs/lora_c
    python grpo.py --model Qwen/Qwen2.5-3B-Instruct --resume                          # continue from runs/grpo
    python grpo.py --model ./tiny-hf-folder --train-data ../shared/data/train_sample.jsonl --steps 2 \
        --prompts-per-step 2 --group-size 4 --max-new-tokens 32 --window 16 --out /tmp/grpo_smoke   # CPU, offline

Why the logged loss is ~0. The rollout is on-policy, so at the (first) update every ratio pi_theta/pi_old is 1 and
the surrogate is -sum_i A_i * len_i / N (N: response tokens of the global batch). Advantages are zero-mean within
each group, so the loss is ~0, exactly 0 when completions have equal lengths; it only reflects how length
correlates with reward, not how well the policy does. Its gradient, -sum_i A_i sum_t grad log pi(y_t) / N, is not
zero. Watch `reward` rise, and `frac_zero_std`: the fraction of groups whose G rewards are all equal, which
carry no signal (advantage 0). At zero_std ~1.0 the prompts are all too hard (or too easy) and nothing is learned.
A micro-batch with no signal is not replayed, and a step whose whole global batch has none takes no AdamW step.

Outputs in --out: log.jsonl (one record per step, with 2 decoded samples), config.json, and ckpt-NNNNNN/ folders
(adapter.safetensors + adapter.json, loadable with pte.load_adapters; trainer.pt: optimizer, RNG, data position).
"""
import argparse
import json
import os
import random
import re
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from model import ModelError, generate, load_model
from pte import AdapterConfig, AdapterError, Adapters, load_adapters, replay, save_adapters


class GRPOError(ValueError):
    """Bad command-line value or unusable checkpoint. The message is one line."""


@dataclass
class GRPOConfig:
    model: str = "Qwen/Qwen2.5-3B-Instruct"
    train_data: str = data.DAPO_HUB_ID
    prompt_style: str = "boxed"
    reward: str = "math"
    method: str = "pte"
    window: int | str | None = None  # int W | "max-question" | "full"; None = max-question (lora: always full)
    max_new_tokens: int = 3072
    temperature: float = 1.0
    top_p: float = 1.0
    group_size: int = 8              # G
    prompts_per_step: int = 64       # global batch = 64 x 8 = 512 responses (paper: 512; §7-A10)
    micro_batch: int = 16            # responses per generate()/replay() call
    steps: int = 200
    updates_per_batch: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_eps: float = 0.2
    kl: float = 0.0
    std: str = "population"
    loss_agg: str = "token-mean"
    rank: int = 32
    alpha: float | None = None
    targets: str = "qkvo"
    global_tokens: int = 32
    global_only: bool = False
    state_softmax: bool = False
    normalize: str = "row"
    seed: int = 0
    out: str = "runs/grpo"
    save_every: int = 25
    keep: int = 3
    dtype: str | None = None
    device: str | None = None
    log_samples: int = 2


def toy_reward(completion, gold, truncated=False):
    """--reward toy: 1.0 if the completion contains any character of `gold`. A random tiny model never writes a
    final answer, so tests and smoke runs use this to get rewards that vary within a group (and can be learned)."""
    return float(any(c in completion for c in gold))


REWARDS = {"math": data.reward, "toy": toy_reward}


def parse_window(s):
    if s is None or s in ("max-question", "full"):
        return s
    try:
        w = int(s)
    except ValueError:
        raise GRPOError(f"--window must be a positive integer, 'max-question' or 'full' (got {s!r})") from None
    if w < 1:
        raise GRPOError(f"--window must be >= 1 thought tokens, or 'max-question' or 'full' (got {w})")
    return w


def validate(cfg: GRPOConfig, world: int):
    cfg.window = parse_window(cfg.window)
    checks = [(cfg.group_size >= 2, "--group-size must be >= 2 (GRPO compares the completions of one prompt)"),
              (cfg.prompts_per_step >= 1 and cfg.prompts_per_step % world == 0,
               f"--prompts-per-step must be a positive multiple of the number of processes ({world})"),
              (cfg.micro_batch >= 1, "--micro-batch must be >= 1"),
              (cfg.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
              (cfg.temperature > 0, "--temperature must be > 0 (GRPO needs sampled, different completions)"),
              (0 < cfg.top_p <= 1, "--top-p must be in (0, 1]"),
              (cfg.steps >= 1 and cfg.save_every >= 1 and cfg.keep >= 1 and cfg.updates_per_batch >= 1,
               "--steps, --save-every, --keep and --updates-per-batch must be >= 1"),
              (cfg.lr > 0 and cfg.clip_eps > 0 and cfg.kl >= 0 and cfg.grad_clip > 0,
               "--lr, --clip-eps and --grad-clip must be > 0 and --kl >= 0"),
              (cfg.std in ("population", "unbiased", "none"), f"unknown --std {cfg.std!r}"),
              (cfg.loss_agg in ("token-mean", "seq-mean"), f"unknown --loss-agg {cfg.loss_agg!r}"),
              (cfg.reward in REWARDS, f"unknown --reward {cfg.reward!r}"),
              (cfg.prompt_style in data.PROMPT_STYLES, f"unknown --prompt-style {cfg.prompt_style!r}")]
    for ok, msg in checks:
        if not ok:
            raise GRPOError(msg)
    adapter_config(cfg)  # AdapterError for a bad method, targets, rank...


def adapter_config(cfg: GRPOConfig) -> AdapterConfig:
    return AdapterConfig(method=cfg.method, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets,
                         n_global=cfg.global_tokens, global_only=cfg.global_only, state_softmax=cfg.state_softmax,
                         normalize=cfg.normalize)


def window_name(cfg: GRPOConfig):
    return "full" if cfg.method == "lora" else cfg.window or "max-question"


def window_for(cfg: GRPOConfig, prompts):
    """The thought-window W of one micro-batch (None = full cache). "max-question", the paper's literal "cache size =
    maximum question length in the current micro-batch" (§7-A1 a), is the longest prompt in tokens (chat template
    included). Method lora is the full-cache baseline: always None."""
    if cfg.method == "lora" or cfg.window == "full":
        return None
    if cfg.window in (None, "max-question"):
        return max(len(p) for p in prompts)
    return cfg.window


def rollout_seed(seed, step, index):
    """Seed of the torch.Generator of micro-batch `index` of `step`, micro-batches counted across ranks (rank r owns
    r*k .. r*k+k-1). Derived from (seed, step, rank) alone, never from a running RNG: a resumed run samples what the
    uninterrupted one did, and N processes sample exactly what one process does with the same global batch."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, np.uint64)[0] >> 1)


def encode_prompt(tok, problem, style):
    text = tok.apply_chat_template([{"role": "user", "content": data.build_user_message(problem, style)}],
                                   add_generation_prompt=True)
    return tok.encode(text)


def step_problems(records, pos, n, seed):
    """Problems at positions [pos, pos + n) of the data stream. Epoch e = pos // len(records) visits the records in
    the order of a permutation seeded by (seed, e): the data position alone fixes what comes next."""
    N, perms, out = len(records), {}, []
    for k in range(pos, pos + n):
        e, i = divmod(k, N)
        if e not in perms:
            perms[e] = np.random.default_rng([seed, e]).permutation(N)
        out.append(records[perms[e][i]])
    return out


# -----------------------------------------------------------------------------------------------------------
# 1. rollout  2. reward  3. advantages

@dataclass
class MicroBatch:
    """B responses sampled by one generate() call and replayed by one replay() call: the same prompts, padding and
    window, so the replay rebuilds exactly the cache (and PTE state S) the rollout had. Groups stay contiguous."""
    prompts: list               # B prompt token-id lists (a prompt is repeated G times, in a row)
    golds: list                 # B gold answers
    window: int | None          # W of rollout and replay (None = full cache)
    seed: int                   # seed of the torch.Generator that sampled this micro-batch
    tokens: torch.Tensor        # (B, L) completion ids, L = longest completion; pad after the stop token
    lengths: torch.Tensor       # (B,) completion lengths, stop token included (EOS is a trained token)
    old_logp: torch.Tensor      # (B, L) log pi_old(y_t | C_t^D) recorded while sampling (0 past the length)
    truncated: torch.Tensor     # (B,) no stop token within --max-new-tokens
    evictions: torch.Tensor     # (B,) eviction events while each sequence was generating
    texts: list | None = None           # decoded completions (score)
    rewards: torch.Tensor | None = None  # (B,) r(y)
    no_answer: torch.Tensor | None = None  # (B,) bool: data.extract_answer found no final answer
    adv: torch.Tensor | None = None     # (B,) advantage, the same for every token of a response
    ref_logp: torch.Tensor | None = None  # (B, L) frozen-base log-probs under the same cache policy (--kl > 0)
    weight: torch.Tensor | None = None  # (B, L) mask / global normaliser: the loss is sum(weight * per-token loss)

    @property
    def mask(self):  # (B, L) completion positions < length
        return torch.arange(self.tokens.shape[1], device=self.tokens.device)[None] < self.lengths[:, None]


@torch.no_grad()
def rollout(model, adapters, tok, problems, cfg: GRPOConfig, step, rank=0, progress=False) -> list[MicroBatch]:
    """Sample G completions of every problem under pi^D_theta with the current adapters, --micro-batch responses per
    generate() call. problems: this rank's share of the step, [{"problem", "answer"}]."""
    device = next(model.parameters()).device
    prompts = [encode_prompt(tok, p["problem"], cfg.prompt_style) for p in problems]
    flat = [(prompts[i], problems[i]["answer"]) for i in range(len(problems)) for _ in range(cfg.group_size)]
    chunks = [flat[a:a + cfg.micro_batch] for a in range(0, len(flat), cfg.micro_batch)]
    out = []
    for j, chunk in enumerate(tqdm(chunks, desc=f"rollout {step}", leave=False, disable=not progress)):
        P = [c[0] for c in chunk]
        W, seed = window_for(cfg, P), rollout_seed(cfg.seed, step, rank * len(chunks) + j)
        g = torch.Generator(device=device).manual_seed(seed)
        gen = generate(model, P, cfg.max_new_tokens, tok.stop_ids, cfg.temperature, cfg.top_p, W, adapter=adapters,
                       generator=g, pad_id=tok.pad_id)
        L = int(gen.lengths.max())
        out.append(MicroBatch(P, [c[1] for c in chunk], W, seed, gen.tokens[:, :L], gen.lengths,
                              gen.logprobs[:, :L], gen.truncated, gen.evictions))
    return out


def score(mbs: list[MicroBatch], tok, reward_fn=data.reward):
    """r(y) for every response: reward_fn(decoded completion, gold, truncated) -> float (data.reward: 1.0 for a
    correct final answer, 0.0 otherwise, also when cut off). Responses without an answer are counted."""
    for mb in mbs:
        n, tr, ids = mb.lengths.tolist(), mb.truncated.tolist(), mb.tokens.tolist()
        mb.texts = [tok.decode(ids[i][:n[i]]) for i in range(len(n))]
        mb.rewards = torch.tensor([float(reward_fn(t, g, x)) for t, g, x in zip(mb.texts, mb.golds, tr)])
        mb.no_answer = torch.tensor([data.extract_answer(t, x) is None for t, x in zip(mb.texts, tr)])


def advantages(rewards, std="population", eps=1e-6):
    """rewards (n_groups, G) -> (advantages (n_groups, G), zero_std (n_groups,) bool).

    A_i = (r_i - mean(r)) / (std(r) + eps) within a group; std="none" keeps r_i - mean(r) (Dr. GRPO). A group
    whose rewards are all equal has no signal: its advantages are exactly 0 and it is counted in zero_std.
    Worked example, one group of G = 4 with one correct answer, r = [1, 0, 0, 0]: mean 0.25,
        population std sqrt(0.25 * 0.75) = 0.433 -> A = [1.732, -0.577, -0.577, -0.577]
        unbiased   std sqrt(0.75 / 3)        = 0.5   -> A = [1.5, -0.5, -0.5, -0.5]
    Default population (np.std, as nano-aha-moment and GRPO-Zero; the paper is silent): the advantages of a group
    with any spread then have mean 0 and mean square exactly 1 whatever G (the unbiased std shrinks them with G)."""
    mean = rewards.mean(1, keepdim=True)
    A = rewards - mean
    if std != "none":
        A = A / (rewards.std(1, correction=int(std == "unbiased"), keepdim=True) + eps)
    zero = (rewards == rewards[:, :1]).all(1)
    return A.masked_fill(zero[:, None], 0.0), zero


# -----------------------------------------------------------------------------------------------------------
# 4. replay log-probs  5. loss / step

def policy_loss(mb: MicroBatch, cfg: GRPOConfig, stats: dict):
    """The loss_fn that pte.replay calls for completion positions [t0, t1) with logp (B, n) = log pi_theta(y_t |
    C_t^D) (with grad). replay backpropagates each segment's value at once, so it returns that segment's share of
    the global loss: sum over tokens of weight * l_t, weight = mask / normaliser of the whole global batch, and
        l_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta * (exp(x_t) - x_t - 1),   x_t = ref_t - logp_t
    with rho_t = exp(logp_t - old_t) against the rollout's recorded log-probs, and the k3 KL estimator."""
    eps, beta, A = cfg.clip_eps, cfg.kl, mb.adv[:, None]

    def loss_fn(logp, t0, t1):
        m, w = mb.mask[:, t0:t1], mb.weight[:, t0:t1]
        ratio = torch.where(m, logp - mb.old_logp[:, t0:t1], 0.0).exp()  # masked first: no exp() of garbage
        per_tok = -torch.minimum(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)
        if beta > 0:
            x = torch.where(m, mb.ref_logp[:, t0:t1] - logp, 0.0)
            kl = x.exp() - x - 1
            per_tok = per_tok + beta * kl
        loss = (per_tok * w).sum()
        with torch.no_grad():  # tensors, not floats: no host sync per segment
            clipped = ((ratio > 1 + eps) & (A > 0)) | ((ratio < 1 - eps) & (A < 0))
            stats["clipped"] += (clipped & m).sum()
            stats["tokens"] += m.sum()
            stats["ratio_dev"] = torch.maximum(stats["ratio_dev"], ((ratio - 1).abs() * m).max())
            stats["loss"] += loss.detach()
            if beta > 0:
                stats["kl"] += (kl * m).sum()
        return loss
    return loss_fn


def make_optimizer(adapters, cfg: GRPOConfig):
    """AdamW over the adapter parameters only (the base model is frozen). The adapters are fp32 even on a bf16
    model (pte.adapter_dtype), so they are their own master weights: `master` is the parameter list."""
    master = list(adapters.parameters())
    return torch.optim.AdamW(master, lr=cfg.lr, weight_decay=cfg.weight_decay), master


def all_reduce(x, world, op=None):
    if world > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def optimizer_step(adapters, opt, master, cfg: GRPOConfig, world):
    """Sum the gradients over ranks (each was pre-divided by the global normaliser, so the sum is the gradient of one
    process holding the whole global batch), clip the norm, step AdamW. Returns the pre-clip adapter grad norm."""
    params = list(adapters.parameters())
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = all_reduce(torch.cat([g.reshape(-1).float() for g in grads]), world)
    for m, g in zip(master, flat.split([p.numel() for p in params])):
        m.grad = g.view(m.shape).to(m.dtype)
    norm = torch.nn.utils.clip_grad_norm_(master, cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    adapters.zero_grad(set_to_none=True)
    if master is not params:
        with torch.no_grad():
            for p, m in zip(params, master):
                p.copy_(m)
    return float(norm)


def train_step(model, adapters, opt, master, mbs: list[MicroBatch], cfg: GRPOConfig, world=1, pad_id=0,
               progress=False) -> dict:
    """--updates-per-batch AdamW steps on one rollout batch. Each replays every micro-batch with gradients (gradient
    accumulation), under the same method, window and eviction schedule as the rollout. old log-probs stay the
    rollout's, so the first update has ratio 1 everywhere and later ones are off-policy (clipped)."""
    device = mbs[0].tokens.device
    n_seq = cfg.prompts_per_step * cfg.group_size
    n_tok = all_reduce(sum(mb.lengths.sum() for mb in mbs).float(), world)  # response tokens of the global batch
    for mb in mbs:
        mb.weight = mb.mask / (n_tok if cfg.loss_agg == "token-mean" else mb.lengths[:, None] * n_seq)
    live = [mb for mb in mbs if cfg.kl > 0 or bool(mb.adv.any())]  # no advantage and no KL: zero gradient
    signal = all_reduce(torch.tensor(float(len(live)), device=device), world)
    if cfg.kl > 0:  # reference: the frozen base under the same cache policy D, no grad (§7-A9)
        adapters.set_enabled(False)
        for mb in live:
            mb.ref_logp = replay(model, adapters, mb.prompts, mb.tokens, mb.window, cfg.temperature, pad_id=pad_id)
        adapters.set_enabled(True)
    zero = lambda: torch.zeros((), device=device)
    stats = {k: zero() for k in ("clipped", "tokens", "loss", "kl", "ratio_dev")}
    out = {"ratio_dev0": 0.0, "grad_norm": 0.0, "updated": bool(signal > 0), "replay_tokens": 0,
           "skipped_mb": len(mbs) - len(live)}
    n_updates = cfg.updates_per_batch if out["updated"] else 0
    bar = tqdm(total=n_updates * len(live), desc="update", leave=False, disable=not progress)
    for u in range(n_updates):
        for mb in live:
            replay(model, adapters, mb.prompts, mb.tokens, mb.window, cfg.temperature,
                   loss_fn=policy_loss(mb, cfg, stats), pad_id=pad_id)
            out["replay_tokens"] += int(mb.lengths.sum())
            bar.update()
        if u == 0:
            out["ratio_dev0"] = float(stats["ratio_dev"])
        out["grad_norm"] = optimizer_step(adapters, opt, master, cfg, world)
    bar.close()
    n = float(stats["tokens"])  # replayed completion tokens, summed over updates
    out.update(clip_frac=float(stats["clipped"]) / max(n, 1), kl=float(stats["kl"]) / max(n, 1) if cfg.kl else None,
               loss=float(stats["loss"]) / max(n_updates, 1), clipped=float(stats["clipped"]), tokens=n)
    return out


def grpo_step(model, adapters, opt, master, tok, problems, cfg: GRPOConfig, step, rank=0, world=1,
              reward_fn=data.reward, progress=False) -> dict:
    """One GRPO iteration on this rank's problems: rollout -> score -> advantages -> replay/loss/AdamW.
    Returns this rank's metrics (sums and lists; gather_metrics merges the ranks)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    mbs = rollout(model, adapters, tok, problems, cfg, step, rank, progress)
    t1 = time.perf_counter()
    score(mbs, tok, reward_fn)
    A, zero = advantages(torch.cat([mb.rewards for mb in mbs]).view(-1, cfg.group_size), cfg.std)
    for mb, a in zip(mbs, A.view(-1).split([len(mb.prompts) for mb in mbs])):
        mb.adv = a.to(mb.tokens.device, mb.old_logp.dtype)
    t2 = time.perf_counter()
    st = train_step(model, adapters, opt, master, mbs, cfg, world, tok.pad_id, progress)
    t3 = time.perf_counter()
    cat = lambda name: torch.cat([getattr(mb, name).float().cpu() for mb in mbs]).tolist()
    samples = sorted(((float(mb.rewards[i]), mb.golds[i], int(mb.lengths[i]), mb.texts[i])
                      for mb in mbs for i in range(len(mb.texts))), key=lambda s: -s[0])
    mem = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU: the process's peak RSS (KiB on Linux)
    return dict(st, rewards=cat("rewards"), lengths=cat("lengths"), truncated=cat("truncated"),
                no_answer=cat("no_answer"), evictions=cat("evictions"), zero_std=zero.float().tolist(),
                logp_sum=float(sum((mb.old_logp * mb.mask).sum() for mb in mbs)), seeds=[mb.seed for mb in mbs],
                windows=sorted({mb.window for mb in mbs}, key=str), samples=samples[:1] + samples[-1:],
                rollout_s=t1 - t0, replay_s=t3 - t2, peak_mem_gb=mem / 2**30)


def gather_metrics(local: dict, world: int, step: int, cfg: GRPOConfig) -> dict:
    """Merge the ranks' metrics (rank 0 logs them): what RL practitioners look at, for the global batch."""
    parts = [local]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, local)
    cat = lambda k: np.array([x for p in parts for x in p[k]])
    r, n, tok = cat("rewards"), cat("lengths"), sum(p["tokens"] for p in parts)
    kl = None if cfg.kl == 0 else sum(p["kl"] * p["tokens"] for p in parts) / max(tok, 1)
    samples = sorted((s for p in parts for s in p["samples"]), key=lambda s: -s[0])
    return {"step": step, "reward": float(r.mean()), "reward_std": float(r.std()),
            "frac_zero_std": float(cat("zero_std").mean()), "no_answer": float(cat("no_answer").mean()),
            "len": float(n.mean()), "len_max": int(n.max()), "trunc": float(cat("truncated").mean()),
            "evictions": float(cat("evictions").mean()), "entropy": -sum(p["logp_sum"] for p in parts) / n.sum(),
            "clip_frac": sum(p["clipped"] for p in parts) / max(tok, 1), "kl": kl,
            "ratio_dev0": max(p["ratio_dev0"] for p in parts), "loss": sum(p["loss"] for p in parts),
            "grad_norm": local["grad_norm"], "updated": local["updated"], "lr": cfg.lr,
            "rollout_tok_s": n.sum() / max(max(p["rollout_s"] for p in parts), 1e-9),
            "replay_tok_s": sum(p["replay_tokens"] for p in parts) / max(max(p["replay_s"] for p in parts), 1e-9),
            "peak_mem_gb": max(p["peak_mem_gb"] for p in parts), "rollout_s": max(p["rollout_s"] for p in parts),
            "replay_s": max(p["replay_s"] for p in parts), "skipped_mb": sum(p["skipped_mb"] for p in parts),
            "seeds": [s for p in parts for s in p["seeds"]], "windows": local["windows"],
            "samples": [{"reward": s[0], "gold": s[1], "len": s[2], "text": s[3][:2000]}
                        for s in (samples[:1] + samples[-1:])[:cfg.log_samples]]}


def log_line(m, steps):
    kl = f" kl {m['kl']:.4f}" if m["kl"] is not None else ""
    return (f"step {m['step']}/{steps} | reward {m['reward']:.3f}±{m['reward_std']:.3f} "
            f"zero_std {m['frac_zero_std']:.2f} no_ans {m['no_answer']:.2f} | len {m['len']:.0f} "
            f"trunc {m['trunc']:.2f} evict {m['evictions']:.1f} | clip {m['clip_frac']:.3f}{kl} "
            f"gnorm {m['grad_norm']:.4f} | rollout {m['rollout_tok_s']:.0f} tok/s replay {m['replay_tok_s']:.0f} tok/s "
            f"| mem {m['peak_mem_gb']:.2f} GB" + ("" if m["updated"] else " | no signal: no update"))


# -----------------------------------------------------------------------------------------------------------
# checkpoints: ckpt-NNNNNN/ = adapter.safetensors + adapter.json + trainer.pt, written to a temp dir, then renamed

def checkpoints(out: Path):
    found = [(int(m.group(1)), p) for p in out.glob("ckpt-*") if (m := re.fullmatch(r"ckpt-(\d+)", p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(out: Path, step, data_pos, adapters, opt, master, cfg: GRPOConfig, tok):
    final, tmp = out / f"ckpt-{step:06d}", out / f".tmp-ckpt-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash while saving
    save_adapters(adapters, tmp, extra={"step": step, "window": window_name(cfg),
                                        "prompt_style": cfg.prompt_style, "chat_template": tok.chat_template,
                                        "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature})
    state = {"step": step, "data_pos": data_pos, "optimizer": opt.state_dict(), "config": asdict(cfg),
             "master": None if master[0] is next(adapters.parameters()) else [m.detach().cpu() for m in master],
             "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(),
             "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(state, tmp / "trainer.pt")
    if final.exists():  # only if a run re-saves a step: move the old one aside before replacing it
        os.replace(final, out / f".old-{final.name}")
    os.replace(tmp, final)  # the new checkpoint is complete before any old one goes
    shutil.rmtree(out / f".old-{final.name}", ignore_errors=True)
    for old in checkpoints(out)[:-cfg.keep]:
        shutil.rmtree(old)
    return final


def read_checkpoint(ckpt: Path, out: Path):
    """trainer.pt of a checkpoint, or a GRPOError that names an intact earlier one (nothing is deleted)."""
    for name in ("adapter.safetensors", "adapter.json", "trainer.pt"):
        if not (ckpt / name).is_file():
            raise corrupt(ckpt, out, f"{name} is missing")
    try:
        state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
        missing = {"step", "data_pos", "optimizer", "config", "master", "rng_torch", "rng_python"} - set(state)
    except Exception as e:
        raise corrupt(ckpt, out, f"trainer.pt is truncated or not a checkpoint ({type(e).__name__})") from None
    if missing:
        raise corrupt(ckpt, out, f"trainer.pt lacks {sorted(missing)}")
    return state


def resume_adapters(model, ckpt: Path, out: Path, state, cfg: GRPOConfig, say):
    try:
        adapters = load_adapters(model, ckpt)  # refuses another base model (fingerprint)
    except AdapterError as e:
        raise corrupt(ckpt, out, e) from None
    if asdict(adapters.cfg) != asdict(adapter_config(cfg)):
        raise GRPOError(f"{ckpt} has adapters {asdict(adapters.cfg)}; the command line asks for "
                        f"{asdict(adapter_config(cfg))}")
    for k, v in state["config"].items():
        if k not in ("steps", "out", "save_every", "keep", "device") and getattr(cfg, k, v) != v:
            say(f"warning: --{k.replace('_', '-')} is {getattr(cfg, k)!r} now, {v!r} in the checkpoint")
    return adapters


def restore(state, opt, master, cfg: GRPOConfig):
    """Optimizer (at the command line's lr), fp32 masters and RNG states -> (step, data position)."""
    opt.load_state_dict(state["optimizer"])
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = cfg.lr, cfg.weight_decay
    if state["master"] is not None:
        with torch.no_grad():
            for m, s in zip(master, state["master"]):
                m.copy_(s)
    torch.set_rng_state(state["rng_torch"])
    random.setstate(state["rng_python"])
    if torch.cuda.is_available() and state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["step"], state["data_pos"]


def corrupt(ckpt: Path, out: Path, reason) -> GRPOError:
    reason = (str(reason).strip().splitlines() or ["?"])[0][:300]
    earlier = [p for p in checkpoints(out) if p != ckpt]
    hint = (f"the earlier checkpoint {earlier[-1].name} is untouched: move {ckpt.name} away to resume from it"
            if earlier else "no earlier checkpoint")
    return GRPOError(f"cannot resume from {ckpt}: {reason}; {hint}")


# -----------------------------------------------------------------------------------------------------------
# main

def init_distributed():
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on CUDA, gloo on CPU. -> (rank, world, device or None)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return rank, world, f"cuda:{local}"
    dist.init_process_group("gloo")
    return rank, world, "cpu"


def train(cfg: GRPOConfig, resume=False, rank=0, world=1, device=None, reward_fn=None, quiet=False):
    validate(cfg, world)
    main_rank, out = rank == 0, Path(cfg.out)
    say = (lambda s: tqdm.write(s)) if main_rank and not quiet else (lambda s: None)
    ckpts = checkpoints(out) if out.is_dir() else []
    if ckpts and not resume:
        raise GRPOError(f"{out} already holds checkpoints ({ckpts[-1].name}): pass --resume, or another --out")
    state = read_checkpoint(ckpts[-1], out) if resume and ckpts else None
    if cfg.method == "lora" and cfg.window not in (None, "full"):
        say("note: --method lora is the full-cache baseline: --window is ignored")
    records = data.load_train(cfg.train_data)
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device or device)
    if not tok.chat_template:
        raise GRPOError(f"{cfg.model} has no chat template: prompts are built with the model's own template")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    adapters = Adapters(model, adapter_config(cfg)) if state is None else \
        resume_adapters(model, ckpts[-1], out, state, cfg, say)
    if world > 1:  # every rank starts from rank 0's adapters
        for p in adapters.parameters():
            dist.broadcast(p.data, 0)
    opt, master = make_optimizer(adapters, cfg)
    step, data_pos = (0, 0) if state is None else restore(state, opt, master, cfg)
    log = out / "log.jsonl"
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        if log.exists():  # drop records of steps after the checkpoint we resume from (they will be redone)
            keep = [ln for ln in log.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            log.write_text("".join(ln + "\n" for ln in keep))
        n_train = sum(p.numel() for p in adapters.parameters())
        say(f"grpo: {cfg.method} | window {window_name(cfg)} | {len(records)} problems | {cfg.model} | "
            f"{n_train:,} adapter parameters | {world} process(es) on {next(model.parameters()).device} | "
            + (f"resumed from {ckpts[-1].name}" if state else "fresh start"))
    reward_fn = reward_fn or REWARDS[cfg.reward]
    n_local = cfg.prompts_per_step // world
    last = None
    while step < cfg.steps:
        step += 1
        problems = step_problems(records, data_pos, cfg.prompts_per_step, cfg.seed)[rank * n_local:(rank + 1) * n_local]
        t0 = time.perf_counter()
        local = grpo_step(model, adapters, opt, master, tok, problems, cfg, step, rank, world, reward_fn,
                          main_rank and not quiet)
        data_pos += cfg.prompts_per_step
        m = gather_metrics(local, world, step, cfg)
        if main_rank:
            m.update(data_pos=data_pos, step_s=time.perf_counter() - t0)
            say(log_line(m, cfg.steps))
            with open(log, "a") as f:
                f.write(json.dumps(m) + "\n")
            if step % cfg.save_every == 0 or step == cfg.steps:
                last = save_checkpoint(out, step, data_pos, adapters, opt, master, cfg, tok)
    if world > 1:
        dist.barrier()
    if main_rank:
        say(f"done: adapters in {last} (pte.load_adapters(model, '{last}'))" if last else
            f"nothing to do: the checkpoint is at step {step}, --steps is {cfg.steps}")
    return adapters


def parse_args(argv=None):
    d = GRPOConfig()
    ap = argparse.ArgumentParser(description="Cache-aware GRPO (Eq. 3) for PTE, LoRA and LoRA_c adapters.")
    a = ap.add_argument
    a("--model", default=d.model, help="local Hugging Face folder or hub id (Qwen2 / Llama architectures)")
    a("--train-data", default=d.train_data, help="local JSONL with problem/answer fields, or a hub dataset id with "
      "the DAPO-Math-17k schema")
    a("--prompt-style", default=d.prompt_style, choices=data.PROMPT_STYLES, help="user message: boxed (put the "
      "answer in \\boxed{}) or dapo (the DAPO template, 'Answer:' line); recorded with the adapters")
    a("--reward", default=d.reward, choices=list(REWARDS), help="math: data.reward, 1 for a correct final answer "
      "(the paper); toy: 1 if the completion contains a character of the gold string (tests, random tiny models)")
    a("--method", default=d.method, choices=["pte", "lora", "lora_c"], help="pte: PTE adapters under the window "
      "cache; lora_c: static LoRA under the window cache; lora: static LoRA with the full cache (ignores --window)")
    a("--window", default=None, help="thought-window W: an int, 'max-question' (default: W = longest prompt of the "
      "micro-batch, in tokens, the paper's literal reading) or 'full'. Method lora always uses the full cache")
    a("--max-new-tokens", type=int, default=d.max_new_tokens, help="rollout length limit (paper: 3072)")
    a("--temperature", type=float, default=d.temperature, help="rollout sampling temperature (replay uses the same)")
    a("--top-p", type=float, default=d.top_p, help="nucleus sampling; < 1 makes the samples slightly off-policy "
      "(the recorded log-probs are those of the untruncated distribution)")
    a("--group-size", type=int, default=d.group_size, help="G, completions per prompt")
    a("--prompts-per-step", type=int, default=d.prompts_per_step, help="prompts per step over all processes "
      "(global batch = this x G responses; default 64 x 8 = 512, the paper's batch)")
    a("--micro-batch", type=int, default=d.micro_batch, help="responses per generate()/replay() call; gradients "
      "accumulate over micro-batches, so lower it to fit memory without changing the result")
    a("--steps", type=int, default=d.steps, help="total optimizer steps (rollout batches), including resumed ones")
    a("--updates-per-batch", type=int, default=d.updates_per_batch, help="AdamW steps per rollout batch; > 1 "
      "reuses the rollout's (then stale) log-probs as pi_old, with clipping")
    a("--lr", type=float, default=d.lr, help="AdamW learning rate (paper: 1e-5)")
    a("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (paper silent)")
    a("--grad-clip", type=float, default=d.grad_clip, help="max adapter grad norm (paper: 1.0)")
    a("--clip-eps", type=float, default=d.clip_eps, help="PPO clip range epsilon (paper silent; 0.2)")
    a("--kl", type=float, default=d.kl, help="beta of the k3 KL to the frozen base model under the same cache policy "
      "(paper-method.md §7-A9); 0 = no reference pass")
    a("--std", default=d.std, choices=["population", "unbiased", "none"], help="advantage scale: group std "
      "(population or unbiased) or none (mean-centred only)")
    a("--loss-agg", default=d.loss_agg, choices=["token-mean", "seq-mean"], help="token-mean: divide by all "
      "response tokens of the global batch; seq-mean: mean over each response, then over responses")
    a("--rank", type=int, default=d.rank, help="LoRA rank r (paper: 32)")
    a("--alpha", type=float, default=None, help="LoRA alpha (default: = rank, scale 1)")
    a("--targets", default=d.targets, choices=["qkvo", "all-linear"], help="adapted linears")
    a("--global-tokens", type=int, default=d.global_tokens, help="PTE global tokens n_g seeding S0 (Eq. 7; paper: 32)")
    a("--global-only", action="store_true", help="PTE ablation Global-Only: evictions are not folded into S")
    a("--state-softmax", action="store_true", help="PTE Eq. 4 with softmax(QK^T/sqrt r) (not the paper's form)")
    a("--normalize", default=d.normalize, choices=["row", "frobenius", "none"], help="PTE Normalize of Eq. 6")
    a("--seed", type=int, default=d.seed, help="seeds adapter init, data order and every rollout generator")
    a("--out", default=d.out, help="output folder: log.jsonl, config.json, ckpt-NNNNNN/")
    a("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (and at the last step)")
    a("--keep", type=int, default=d.keep, help="keep the last K checkpoints")
    a("--resume", action="store_true", help="continue exactly from the latest checkpoint in --out")
    a("--dtype", default=None, choices=["float32", "bfloat16", "float64"], help="model dtype (default: bf16 on CUDA, fp32 on "
      "CPU; float64 for exactness checks); adapters and AdamW state stay fp32")
    a("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    a("--log-samples", type=int, default=d.log_samples, help="decoded samples per step in log.jsonl")
    args = ap.parse_args(argv)
    cfg = GRPOConfig(**{f.name: getattr(args, f.name) for f in fields(GRPOConfig)})
    return cfg, args.resume


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--demo" in argv:  # the paper in miniature (demo.py): same functions, toy model, task and budgets
        from demo import main as demo_main
        demo_main([a for a in argv if a != "--demo"])
        return 0
    cfg, resume = parse_args(argv)
    rank = 0
    try:
        rank, world, device = init_distributed()
        train(cfg, resume, rank, world, device)
        return 0
    except (data.DataError, ModelError, AdapterError, GRPOError) as e:
        print(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: continue with the same command plus --resume (from the latest ckpt in {cfg.out})",
              file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
