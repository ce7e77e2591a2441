"""
grpo.py: cache-aware GRPO, Eq. 3 of the paper, for the three methods of Table 1 through one code path:

    L^D_GRPO(theta) = E_{y ~ pi^D_theta(.|p)} [ r(y) - beta * KL(pi^D_theta || pi_ref) ]
        (Eq. 3; pi^D is Eq. 1)

    --method pte     PTE adapters (pte.py): rollout and replay under the sliding-window cache policy D
    --method lora_c  static LoRA under the same cache policy D (naive cache truncation)
    --method lora    static LoRA with the full cache: --window is ignored (the memory-hungry baseline)

One step, in the order of the algorithm (the order of this file):
    rollout()      G completions per prompt, sampled under D with the current adapters (model.generate), many
                   responses per generate() call (--rollout-batch), cut into replay micro-batches
                   (--micro-batch)
    score()        r(y) = data.reward(completion, gold): 1.0 for a correct final answer, else 0.0; the answer
                   extracted for it (data.grade, once per completion) also gives the no-answer rate
    advantages()   A_i = (r_i - mean) / (std + 1e-6) within each group of G completions of one prompt
    policy_loss()  the per-token PPO-clipped surrogate (+ k3 KL), the closure pte.replay() calls per segment
    train_step()   replay log-probs with gradients micro-batch by micro-batch, all-reduce, clip, AdamW
                   (adapters)
    grpo_step()    the five above; train() loops over steps, logs and checkpoints
The plumbing (validation, optimizer, metrics, distributed setup, command line) follows below them.

Run:
    python grpo.py --model Qwen/Qwen2.5-3B-Instruct                                 # one GPU, paper settings
    torchrun --nproc_per_node 8 grpo.py --model Qwen/Qwen2.5-3B-Instruct --method lora_c --out runs/lora_c
    python grpo.py --model Qwen/Qwen2.5-3B-Instruct --resume                        # continue from runs/grpo
    python grpo.py --plot runs/pte runs/lora_c                                      # training curves, one PNG
    python grpo.py --model ./tiny-hf-folder --train-data ../shared/data/train_sample.jsonl --steps 2 \
        --prompts-per-step 2 --group-size 4 --max-new-tokens 32 --window 16 --out /tmp/grpo_smoke
                                                                                    # CPU, offline

Why the logged loss is ~0. The rollout is on-policy, so at the (first) update every ratio pi_theta/pi_old is 1
and the surrogate is -sum_i A_i * len_i / N (N: response tokens of the global batch). Advantages are zero-mean
within each group, so the loss is ~0, exactly 0 when completions have equal lengths; it only reflects how
length correlates with reward, not how well the policy does. Its gradient,
-sum_i A_i sum_t grad log pi(y_t) / N, is not zero. Watch `reward` rise, and `frac_zero_std`: the fraction of
groups whose G rewards are all equal, which carry no signal (advantage 0). At zero_std ~1.0 the prompts are
all too hard (or too easy) and nothing is learned. A micro-batch with no signal is not replayed, and a step
whose whole global batch has none takes no AdamW step.

Outputs in --out: log.jsonl (one record per step, with 2 decoded samples), config.json, curves.png (reward,
length, clip fraction and evictions per step) and ckpt-NNNNNN/ folders (checkpoint.py: adapter.safetensors +
adapter.json, loadable with checkpoint.load_adapters; trainer.pt: optimizer, RNG, data position).
"""
import argparse
import functools
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from cache import parse_window
from checkpoint import (CheckpointError, checkpoints, load_checkpoint_adapters, read_checkpoint, restore,
                        save_checkpoint)
from model import (DEFAULT_MODEL, ModelError, batch_that_fits, generate, load_model, peak_memory,
                   reset_peak_memory)
from pte import FOLD_KEYS, STATE_UPDATES, AdapterConfig, AdapterError, Adapters, replay


class GRPOError(ValueError):
    """Bad command-line value or unusable run folder. The message is one line."""


@dataclass
class GRPOConfig:
    model: str = DEFAULT_MODEL
    train_data: str = data.DAPO_HUB_ID
    prompt_style: str = "dapo"        # DAPO-Math-17k's own template (README choice 14)
    reward: str = "math"
    method: str = "pte"
    # int W | "max-question" | "full"; None = max-question (lora: always full)
    window: int | str | None = None
    max_new_tokens: int = 3072
    temperature: float = 1.0
    top_p: float = 1.0
    group_size: int = 8               # G
    prompts_per_step: int = 64        # global batch = 64 x 8 = 512 responses (paper: 512; README choice 12)
    # responses per generate() call; None: as many as fit (rollout_batch_size)
    rollout_batch: int | None = None
    micro_batch: int = 16             # responses per replay() call
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
    state_update: str = "literal"     # Eq. 6's weight of S' (README choice 8)
    fold_keys: str = "rotated"
    seed: int = 0
    out: str = "runs/grpo"
    save_every: int = 25
    keep: int = 3
    dtype: str | None = None
    device: str | None = None
    log_samples: int = 2


# -----------------------------------------------------------------------------------------------------------
# 1. rollout

@dataclass
class MicroBatch:
    """B responses replayed by one replay() call, cut from one rollout batch (one generate() call): the same
    prompts, window and eviction schedule, so the replay rebuilds exactly the cache (and PTE state S) that
    each response had while it was sampled. A prompt's G responses are contiguous and never leave their
    rollout batch."""
    prompts: list               # B prompt token-id lists
    golds: list                 # B gold answers
    window: int | None          # W of the rollout batch (None = full cache)
    seed: int                   # seed of the torch.Generator that sampled the rollout batch
    tokens: torch.Tensor        # (B, L) completion ids, L = longest completion; pad after the stop token
    lengths: torch.Tensor       # (B,) completion lengths, stop token included (EOS is a trained token)
    old_logp: torch.Tensor      # (B, L) log pi_old(y_t | C_t^D) recorded while sampling (0 past the length)
    truncated: torch.Tensor     # (B,) no stop token within --max-new-tokens
    evictions: torch.Tensor     # (B,) eviction events while each sequence was generating

    @property
    def mask(self):  # (B, L) completion positions < length
        return torch.arange(self.tokens.shape[1], device=self.tokens.device)[None] < self.lengths[:, None]


@torch.no_grad()
def rollout(model, adapters, tok, problems, cfg: GRPOConfig, step, rank=0,
            progress=False) -> list[MicroBatch]:
    """Sample G completions of every problem under pi^D_theta with the current adapters, rollout_batch_size()
    responses per generate() call, and cut them into --micro-batch responses for the replay.
    problems: this rank's share of the step, [{"problem", "answer"}]."""
    device = next(model.parameters()).device
    prompts = [data.encode_prompt(tok, p["problem"], cfg.prompt_style) for p in problems]
    flat = [(prompts[i], problems[i]["answer"]) for i in range(len(problems)) for _ in range(cfg.group_size)]
    n = rollout_batch_size(cfg, model, len(flat), max(map(len, prompts)))
    batches = [flat[a:a + n] for a in range(0, len(flat), n)]
    out = []
    for j, batch in enumerate(tqdm(batches, desc=f"rollout {step}", leave=False, disable=not progress)):
        prompts_b = [b[0] for b in batch]
        # seed index: the global position of the batch's first response. Every rank holds the same number of
        # responses (validate: --prompts-per-step is a multiple of the world size), so rank r's start at
        # r * len(flat). Counting batches instead would let two ranks share a seed when their rollout batch
        # sizes differ (on CUDA each rank sizes its own from free memory and its longest prompt).
        W, seed = window_for(cfg, prompts_b), rollout_seed(cfg.seed, step, rank * len(flat) + j * n)
        g = torch.Generator(device=device).manual_seed(seed)
        gen = generate(model, prompts_b, cfg.max_new_tokens, tok.stop_ids, cfg.temperature, cfg.top_p, W,
                       adapter=adapters, generator=g, pad_id=tok.pad_id)
        for a in range(0, len(batch), cfg.micro_batch):
            s = slice(a, a + cfg.micro_batch)
            L = int(gen.lengths[s].max())
            out.append(MicroBatch(prompts_b[s], [b[1] for b in batch[s]], W, seed, gen.tokens[s, :L],
                                  gen.lengths[s], gen.logprobs[s, :L], gen.truncated[s], gen.evictions[s]))
    return out


# -----------------------------------------------------------------------------------------------------------
# 2. reward  3. advantages

def score(mbs: list[MicroBatch], tok, reward_fn):
    """-> (texts, rewards (N,), no_answer (N,) bool) over every response of `mbs`, in order.
    reward_fn(decoded completion, gold, truncated) -> float, or a (float, answer) pair from a reward that
    extracts an answer (math_reward): the answer it graded, None counted as no_answer. A reward that returns
    a plain float has no notion of an answer: its completions count as answered."""
    texts, rewards, no_answer = [], [], []
    for mb in mbs:
        n, tr, ids = mb.lengths.tolist(), mb.truncated.tolist(), mb.tokens.tolist()
        for i in range(len(n)):
            texts.append(tok.decode(ids[i][:n[i]]))
            out = reward_fn(texts[-1], mb.golds[i], tr[i])
            r, answered = (out[0], out[1] is not None) if isinstance(out, tuple) else (out, True)
            rewards.append(float(r))
            no_answer.append(not answered)
    return texts, torch.tensor(rewards), torch.tensor(no_answer)


def advantages(rewards, std="population", eps=1e-6):
    """rewards (n_groups, G) -> (advantages (n_groups, G), zero_std (n_groups,) bool).

    A_i = (r_i - mean(r)) / (std(r) + eps) within a group; std="none" keeps r_i - mean(r) (Dr. GRPO). A group
    whose rewards are all equal has no signal: its advantages are exactly 0 and it is counted in zero_std.
    Worked example, one group of G = 4 with one correct answer, r = [1, 0, 0, 0]: mean 0.25,
        population std sqrt(0.25 * 0.75) = 0.433 -> A = [1.732, -0.577, -0.577, -0.577]
        unbiased   std sqrt(0.75 / 3)        = 0.5   -> A = [1.5, -0.5, -0.5, -0.5]
    Default population (np.std, as nano-aha-moment and GRPO-Zero; the paper is silent): the advantages of a
    group with any spread then have mean 0 and mean square exactly 1 whatever G (the unbiased std shrinks
    them with G)."""
    mean = rewards.mean(1, keepdim=True)
    A = rewards - mean
    if std != "none":
        A = A / (rewards.std(1, correction=int(std == "unbiased"), keepdim=True) + eps)
    zero = (rewards == rewards[:, :1]).all(1)
    return A.masked_fill(zero[:, None], 0.0), zero


# -----------------------------------------------------------------------------------------------------------
# 4. loss  5. step

def policy_loss(mb: MicroBatch, adv, weight, ref_logp, cfg: GRPOConfig, stats: dict):
    """The loss_fn that pte.replay calls for completion positions [t0, t1) with logp (B, n) =
    log pi_theta(y_t | C_t^D) (with grad). adv (B,): each response's advantage; weight (B, L): mask /
    normaliser of the whole global batch; ref_logp (B, L): the frozen base's log-probs (only with --kl > 0).
    replay backpropagates each segment's value at once, so it returns that segment's share of the global loss,
    sum over tokens of weight * l_t,
        l_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta * (exp(x_t) - x_t - 1),
        x_t = ref_t - logp_t
    with rho_t = exp(logp_t - old_t) against the rollout's recorded log-probs, and the k3 KL estimator."""
    eps, beta, A = cfg.clip_eps, cfg.kl, adv[:, None]

    def loss_fn(logp, t0, t1):
        m, w = mb.mask[:, t0:t1], weight[:, t0:t1]
        ratio = torch.where(m, logp - mb.old_logp[:, t0:t1], 0.0).exp()  # masked first: no exp() of garbage
        per_tok = -torch.minimum(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)
        if beta > 0:
            x = torch.where(m, ref_logp[:, t0:t1] - logp, 0.0)
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


def train_step(model, adapters, opt, mbs: list[MicroBatch], adv: list, cfg: GRPOConfig, world=1, pad_id=0,
               progress=False) -> dict:
    """--updates-per-batch AdamW steps on one rollout. Each replays every micro-batch with gradients (gradient
    accumulation), under the same method, window and eviction schedule as the rollout. adv: one (B,) tensor
    per micro-batch. old log-probs stay the rollout's, so the first update has ratio 1 everywhere and later
    ones are off-policy (clipped)."""
    device = mbs[0].tokens.device
    n_seq = cfg.prompts_per_step * cfg.group_size
    # response tokens of the global batch
    n_tok = all_reduce(sum(mb.lengths.sum() for mb in mbs).float(), world)
    weight = [mb.mask / (n_tok if cfg.loss_agg == "token-mean" else mb.lengths[:, None] * n_seq)
              for mb in mbs]
    # no advantage, no KL: no gradient
    live = [i for i, mb in enumerate(mbs) if cfg.kl > 0 or bool(adv[i].any())]
    signal = all_reduce(torch.tensor(float(len(live)), device=device), world)
    ref_logp = [None] * len(mbs)
    if cfg.kl > 0:  # reference: the frozen base under the same cache policy D, no grad (README choice 11)
        adapters.set_enabled(False)
        for i in live:
            ref_logp[i] = replay(model, adapters, mbs[i].prompts, mbs[i].tokens, mbs[i].window,
                                 cfg.temperature, pad_id=pad_id)
        adapters.set_enabled(True)
    zero = lambda: torch.zeros((), device=device)
    stats = {k: zero() for k in ("clipped", "tokens", "loss", "kl", "ratio_dev")}
    out = {"ratio_dev0": 0.0, "grad_norm": 0.0, "updated": bool(signal > 0), "replay_tokens": 0,
           "skipped_mb": len(mbs) - len(live)}
    n_updates = cfg.updates_per_batch if out["updated"] else 0
    bar = tqdm(total=n_updates * len(live), desc="update", leave=False, disable=not progress)
    for u in range(n_updates):
        for i in live:
            mb = mbs[i]
            replay(model, adapters, mb.prompts, mb.tokens, mb.window, cfg.temperature, pad_id=pad_id,
                   loss_fn=policy_loss(mb, adv[i], weight[i], ref_logp[i], cfg, stats))
            out["replay_tokens"] += int(mb.lengths.sum())
            bar.update()
        if u == 0:
            out["ratio_dev0"] = float(stats["ratio_dev"])
        out["grad_norm"] = optimizer_step(adapters, opt, cfg, world)
    bar.close()
    n = float(stats["tokens"])  # replayed completion tokens, summed over updates
    out.update(clip_frac=float(stats["clipped"]) / max(n, 1),
               kl=float(stats["kl"]) / max(n, 1) if cfg.kl else None,
               loss=float(stats["loss"]) / max(n_updates, 1), clipped=float(stats["clipped"]), tokens=n)
    return out


def grpo_step(model, adapters, opt, tok, problems, cfg: GRPOConfig, step, rank=0, world=1, reward_fn=None,
              progress=False) -> dict:
    """One GRPO iteration on this rank's problems: rollout -> score -> advantages -> replay/loss/AdamW.
    Returns this rank's metrics (sums and lists; gather_metrics merges the ranks)."""
    reward_fn = reward_fn or reward_for(cfg)
    device = next(model.parameters()).device
    reset_peak_memory(device)
    t0 = time.perf_counter()
    mbs = rollout(model, adapters, tok, problems, cfg, step, rank, progress)
    t1 = time.perf_counter()
    texts, rewards, no_answer = score(mbs, tok, reward_fn)
    A, zero = advantages(rewards.view(-1, cfg.group_size), cfg.std)
    adv = [a.to(device, mb.old_logp.dtype)
           for mb, a in zip(mbs, A.view(-1).split([len(mb.prompts) for mb in mbs]))]
    t2 = time.perf_counter()
    st = train_step(model, adapters, opt, mbs, adv, cfg, world, tok.pad_id, progress)
    t3 = time.perf_counter()
    cat = lambda name: torch.cat([getattr(mb, name).float().cpu() for mb in mbs]).tolist()
    golds = [g for mb in mbs for g in mb.golds]
    samples = sorted(zip(rewards.tolist(), golds, cat("lengths"), texts), key=lambda s: -s[0])
    return dict(st, rewards=rewards.tolist(), lengths=cat("lengths"), truncated=cat("truncated"),
                no_answer=no_answer.float().tolist(), evictions=cat("evictions"),
                zero_std=zero.float().tolist(),
                logp_sum=float(sum((mb.old_logp * mb.mask).sum() for mb in mbs)),
                seeds=list(dict.fromkeys(mb.seed for mb in mbs)),
                windows=sorted({mb.window for mb in mbs}, key=str), samples=samples[:1] + samples[-1:],
                rollout_s=t1 - t0, replay_s=t3 - t2, peak_mem_gb=peak_memory(device) / 2**30)


def train(cfg: GRPOConfig, resume=False, rank=0, world=1, device=None, reward_fn=None, quiet=False):
    validate(cfg, world)
    main_rank, out = rank == 0, Path(cfg.out)
    say = (lambda s: tqdm.write(s)) if main_rank and not quiet else (lambda s: None)
    ckpts = checkpoints(out) if out.is_dir() else []
    if ckpts and not resume:
        raise GRPOError(f"{out} already holds checkpoints ({ckpts[-1].name}): "
                        "pass --resume, or another --out")
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
    opt = make_optimizer(adapters, cfg)
    step, data_pos = (0, 0) if state is None else restore(state, opt, cfg.lr, cfg.weight_decay)
    log = out / "log.jsonl"
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        if log.exists():  # drop records of steps after the checkpoint we resume from (they will be redone)
            keep = [ln for ln in log.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= step]
            log.write_text("".join(ln + "\n" for ln in keep))
        n_train = sum(p.numel() for p in adapters.parameters())
        say(f"grpo: {cfg.method} | window {window_name(cfg)} | {len(records)} problems | {cfg.model} | "
            f"{n_train:,} adapter parameters | {world} process(es) on {next(model.parameters()).device} | "
            + (f"resumed from {ckpts[-1].name}" if state else "fresh start"))
    n_local = cfg.prompts_per_step // world
    last = None
    while step < cfg.steps:
        step += 1
        problems = step_problems(records, data_pos, cfg.prompts_per_step,
                                 cfg.seed)[rank * n_local:(rank + 1) * n_local]
        t0 = time.perf_counter()
        local = grpo_step(model, adapters, opt, tok, problems, cfg, step, rank, world, reward_fn,
                          main_rank and not quiet)
        data_pos += cfg.prompts_per_step
        m = gather_metrics(local, world, step, cfg)
        if main_rank:
            m.update(data_pos=data_pos, step_s=time.perf_counter() - t0)
            say(log_line(m, cfg.steps))
            with open(log, "a") as f:
                f.write(json.dumps(m) + "\n")
            if step % cfg.save_every == 0 or step == cfg.steps:
                last = save_checkpoint(out, step, data_pos, adapters, opt, asdict(cfg),
                                       checkpoint_meta(cfg, tok), cfg.keep)
                plot_runs([out], out / "curves.png")
    if world > 1:
        dist.barrier()
    if main_rank:
        say(f"done: adapters in {last} (checkpoint.load_adapters(model, '{last}'); "
            f"curves in {out / 'curves.png'})"
            if last else f"nothing to do: the checkpoint is at step {step}, --steps is {cfg.steps}")
    return adapters


# -----------------------------------------------------------------------------------------------------------
# the pieces the algorithm uses: rewards, windows, seeds, batch sizes, data order

def toy_reward(completion, gold, truncated=False):
    """--reward toy: 1.0 if the completion contains any character of `gold`. A random tiny model never writes
    a final answer, so tests and smoke runs use this to get rewards that vary within a group
    (and can be learned)."""
    return float(any(c in completion for c in gold))


REWARDS = ("math", "toy")


def math_reward(completion, gold, truncated=False, style=None):
    """--reward math: data.reward's strict grading, only the marker of the prompt style counts (README choice
    14). -> (reward, the answer it graded or None): score() takes the no_answer rate from the same extraction,
    so each answer is extracted once."""
    answer, correct = data.grade(completion, gold, truncated, strict=True, style=style)
    return float(correct), answer


def reward_for(cfg: GRPOConfig):
    """math: math_reward narrowed to the marker the prompt asked for; toy: toy_reward."""
    return functools.partial(math_reward, style=cfg.prompt_style) if cfg.reward == "math" else toy_reward


def window_name(cfg: GRPOConfig):
    return "full" if cfg.method == "lora" else cfg.window or "max-question"


def window_for(cfg: GRPOConfig, prompts):
    """The thought-window W of one rollout batch (None = full cache). "max-question", the paper's literal
    "cache size = maximum question length in the current micro-batch" (README choice 1), is the longest prompt
    of the rollout batch in tokens (chat template included); its replay micro-batches reuse that W. Method
    lora is the full-cache baseline: always None."""
    if cfg.method == "lora" or cfg.window == "full":
        return None
    if cfg.window in (None, "max-question"):
        return max(len(p) for p in prompts)
    return cfg.window


def rollout_seed(seed, step, index):
    """Seed of the torch.Generator of the rollout batch of `step` whose first response is response `index` of
    the global batch (rank r's responses are r*m .. r*m+m-1, m per rank): distinct batches get distinct
    indices whatever batch size each rank picks. Derived from (seed, step, index) alone, never from a running
    RNG: a resumed run samples what the uninterrupted one did, and N processes cutting the same rollout
    batches sample exactly what one process does with the same global batch."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, np.uint64)[0] >> 1)


def rollout_batch_size(cfg: GRPOConfig, model, n_responses, max_prompt):
    """Responses per generate() call: --rollout-batch, else on CUDA as many as half the free memory holds
    (model.batch_that_fits: the KV cache of prompt + window), else --micro-batch; always whole groups, and
    never more than this rank's responses. A constant-memory window is what makes a large batch cheap."""
    G = cfg.group_size
    n = cfg.rollout_batch or cfg.micro_batch
    if cfg.rollout_batch is None:
        W = {None: max_prompt, "max-question": max_prompt,
             "full": cfg.max_new_tokens}.get(cfg.window, cfg.window)
        slots = max_prompt + (cfg.max_new_tokens if cfg.method == "lora" else min(W, cfg.max_new_tokens))
        n = batch_that_fits(model, slots) or n
    return min(max(G, n // G * G), n_responses)


def step_problems(records, pos, n, seed):
    """Problems at positions [pos, pos + n) of the data stream. Epoch e = pos // len(records) visits the
    records in the order of a permutation seeded by (seed, e):
    the data position alone fixes what comes next."""
    N, perms, out = len(records), {}, []
    for k in range(pos, pos + n):
        e, i = divmod(k, N)
        if e not in perms:
            perms[e] = np.random.default_rng([seed, e]).permutation(N)
        out.append(records[perms[e][i]])
    return out


# -----------------------------------------------------------------------------------------------------------
# configuration checks and the optimizer

def validate(cfg: GRPOConfig, world: int):
    try:
        cfg.window = parse_window(cfg.window, also=("max-question", "full"))
    except ValueError as e:
        raise GRPOError(str(e)) from None
    G = cfg.group_size
    checks = [(G >= 2, "--group-size must be >= 2 (GRPO compares the completions of one prompt)"),
              (cfg.prompts_per_step >= 1 and cfg.prompts_per_step % world == 0,
               f"--prompts-per-step must be a positive multiple of the number of processes ({world})"),
              (cfg.micro_batch >= 1, "--micro-batch must be >= 1"),
              (cfg.rollout_batch is None or (cfg.rollout_batch >= G and cfg.rollout_batch % G == 0),
               f"--rollout-batch must be a positive multiple of --group-size ({G}): groups stay whole"),
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
                         n_global=cfg.global_tokens, global_only=cfg.global_only,
                         state_softmax=cfg.state_softmax, normalize=cfg.normalize,
                         state_update=cfg.state_update, fold_keys=cfg.fold_keys)


def make_optimizer(adapters, cfg: GRPOConfig):
    """AdamW over the adapter parameters only (the base model is frozen). Adapters are fp32 even on a bf16
    model (pte.adapter_dtype, README choice 13): no separate master copies. Constant lr, no warm-up
    (choice 12)."""
    return torch.optim.AdamW(adapters.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def all_reduce(x, world, op=None):
    if world > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def optimizer_step(adapters, opt, cfg: GRPOConfig, world):
    """Sum the gradients over ranks (each was pre-divided by the global normaliser, so the sum is the gradient
    of one process holding the whole global batch), clip the norm, step AdamW. Returns the pre-clip adapter
    grad norm."""
    params = list(adapters.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = all_reduce(torch.cat([p.grad.reshape(-1) for p in params]), world)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view(p.shape))
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


# -----------------------------------------------------------------------------------------------------------
# checkpoints (the files are checkpoint.py's): what a GRPO run records, and resuming it

def checkpoint_meta(cfg: GRPOConfig, tok) -> dict:
    """Written into adapter.json beside the adapters: what eval.py needs to evaluate them as they were
    trained."""
    return {"window": window_name(cfg), "prompt_style": cfg.prompt_style, "chat_template": tok.chat_template,
            "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature}


def resume_adapters(model, ckpt: Path, out: Path, state, cfg: GRPOConfig, say):
    adapters = load_checkpoint_adapters(model, ckpt, out)
    if asdict(adapters.cfg) != asdict(adapter_config(cfg)):
        raise GRPOError(f"{ckpt} has adapters {asdict(adapters.cfg)}; the command line asks for "
                        f"{asdict(adapter_config(cfg))}")
    for k, v in state["config"].items():
        if k not in ("steps", "out", "save_every", "keep", "device") and getattr(cfg, k, v) != v:
            say(f"warning: --{k.replace('_', '-')} is {getattr(cfg, k)!r} now, {v!r} in the checkpoint")
    return adapters


# -----------------------------------------------------------------------------------------------------------
# metrics: one record per step in log.jsonl, one line on the terminal, curves.png

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
            "evictions": float(cat("evictions").mean()),
            "entropy": -sum(p["logp_sum"] for p in parts) / n.sum(),
            "clip_frac": sum(p["clipped"] for p in parts) / max(tok, 1), "kl": kl,
            "ratio_dev0": max(p["ratio_dev0"] for p in parts), "loss": sum(p["loss"] for p in parts),
            "grad_norm": local["grad_norm"], "updated": local["updated"], "lr": cfg.lr,
            "rollout_tok_s": n.sum() / max(max(p["rollout_s"] for p in parts), 1e-9),
            "replay_tok_s": sum(p["replay_tokens"] for p in parts)
                            / max(max(p["replay_s"] for p in parts), 1e-9),
            "peak_mem_gb": max(p["peak_mem_gb"] for p in parts),
            "rollout_s": max(p["rollout_s"] for p in parts),
            "replay_s": max(p["replay_s"] for p in parts), "skipped_mb": sum(p["skipped_mb"] for p in parts),
            "seeds": [s for p in parts for s in p["seeds"]], "windows": local["windows"],
            "samples": [{"reward": s[0], "gold": s[1], "len": s[2], "text": s[3][:2000]}
                        for s in (samples[:1] + samples[-1:])[:cfg.log_samples]]}


def log_line(m, steps):
    kl = f" kl {m['kl']:.4f}" if m["kl"] is not None else ""
    return (f"step {m['step']}/{steps} | reward {m['reward']:.3f}±{m['reward_std']:.3f} "
            f"zero_std {m['frac_zero_std']:.2f} no_ans {m['no_answer']:.2f} | len {m['len']:.0f} "
            f"trunc {m['trunc']:.2f} evict {m['evictions']:.1f} | clip {m['clip_frac']:.3f}{kl} "
            f"gnorm {m['grad_norm']:.4f} | rollout {m['rollout_tok_s']:.0f} tok/s "
            f"replay {m['replay_tok_s']:.0f} tok/s | mem {m['peak_mem_gb']:.2f} GB"
            + ("" if m["updated"] else " | no signal: no update"))


def plot_runs(runs, path):
    """Training curves of one or more runs (their log.jsonl), one line per run labelled by its method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("reward", "mean reward"), ("len", "response length (tokens)"), ("clip_frac", "clip fraction"),
              ("evictions", "eviction events per response")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for run in map(Path, runs):
        recs = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if ln.strip()]
        cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
        label = f"{cfg.get('method', '?')} ({run.name})"
        for ax, (key, title) in zip(axes, panels):
            ax.plot([r["step"] for r in recs], [r[key] for r in recs], label=label)
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------------------------------------
# processes and the command line

def init_distributed():
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on CUDA, gloo on CPU.
    -> (rank, world, device or None)."""
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


def parse_args(argv=None):
    d = GRPOConfig()
    ap = argparse.ArgumentParser(description="Cache-aware GRPO (Eq. 3) for PTE, LoRA and LoRA_c adapters.")
    a = ap.add_argument
    a("--model", default=d.model, help="local Hugging Face folder or hub id (Qwen2 / Llama architectures)")
    a("--train-data", default=d.train_data, help="local JSONL with problem/answer fields, or a hub dataset "
      "id with the DAPO-Math-17k schema")
    a("--prompt-style", default=d.prompt_style, choices=data.PROMPT_STYLES, help="user message: dapo "
      "(default: DAPO-Math-17k's template, an 'Answer:' line) or boxed (put the answer in \\boxed{}); the "
      "reward accepts only that style's marker; recorded with the adapters")
    a("--reward", default=d.reward, choices=REWARDS, help="math: data.reward, 1 for a correct final answer "
      "(the paper); toy: 1 if the completion contains a character of the gold string "
      "(tests, random tiny models)")
    a("--method", default=d.method, choices=["pte", "lora", "lora_c"], help="pte: PTE adapters under the "
      "window cache; lora_c: static LoRA under the window cache; "
      "lora: static LoRA with the full cache (ignores --window)")
    a("--window", default=None, help="thought-window W: an int, 'max-question' (default: W = longest "
      "prompt of the rollout batch, in tokens, the paper's literal reading) or 'full'. "
      "Method lora always uses the full cache")
    a("--max-new-tokens", type=int, default=d.max_new_tokens, help="rollout length limit (paper: 3072)")
    a("--temperature", type=float, default=d.temperature, help="rollout sampling temperature "
      "(replay uses the same)")
    a("--top-p", type=float, default=d.top_p, help="nucleus sampling; < 1 makes the samples slightly "
      "off-policy (the recorded log-probs are those of the untruncated distribution)")
    a("--group-size", type=int, default=d.group_size, help="G, completions per prompt")
    a("--prompts-per-step", type=int, default=d.prompts_per_step, help="prompts per step over all processes "
      "(global batch = this x G responses; default 64 x 8 = 512, the paper's batch)")
    a("--rollout-batch", type=int, default=None, help="responses per generate() call, a multiple of "
      "--group-size (default: on CUDA as many of this process's responses as half the free memory holds; "
      "else --micro-batch)")
    a("--micro-batch", type=int, default=d.micro_batch, help="responses per replay() call; gradients "
      "accumulate over micro-batches, so lower it to fit memory without changing the result")
    a("--steps", type=int, default=d.steps, help="total optimizer steps (rollout batches), "
      "including resumed ones")
    a("--updates-per-batch", type=int, default=d.updates_per_batch, help="AdamW steps per rollout batch; > 1 "
      "reuses the rollout's (then stale) log-probs as pi_old, with clipping")
    a("--lr", type=float, default=d.lr, help="AdamW learning rate, constant (paper: 1e-5)")
    a("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (paper silent)")
    a("--grad-clip", type=float, default=d.grad_clip, help="max adapter grad norm (paper: 1.0)")
    a("--clip-eps", type=float, default=d.clip_eps, help="PPO clip range epsilon (paper silent; 0.2)")
    a("--kl", type=float, default=d.kl, help="beta of the k3 KL to the frozen base model under the same "
      "cache policy (README choice 11); 0 = no reference pass")
    a("--std", default=d.std, choices=["population", "unbiased", "none"], help="advantage scale: group std "
      "(population or unbiased) or none (mean-centred only)")
    a("--loss-agg", default=d.loss_agg, choices=["token-mean", "seq-mean"], help="token-mean: divide by all "
      "response tokens of the global batch; seq-mean: mean over each response, then over responses")
    a("--rank", type=int, default=d.rank, help="LoRA rank r (paper: 32)")
    a("--alpha", type=float, default=None, help="LoRA alpha (default: = rank, scale 1)")
    a("--targets", default=d.targets, choices=["qkvo", "all-linear"], help="adapted linears")
    a("--global-tokens", type=int, default=d.global_tokens, help="PTE global tokens n_g seeding S0 "
      "(Eq. 7; paper: 32)")
    a("--global-only", action="store_true", help="PTE ablation Global-Only: evictions are not folded into S")
    a("--state-softmax", action="store_true", help="PTE Eq. 4 with softmax(QK^T/sqrt r) "
      "(not the paper's form)")
    a("--normalize", default=d.normalize, choices=["row", "frobenius", "none"], help="PTE Normalize of Eq. 6")
    a("--state-update", default=d.state_update, choices=STATE_UPDATES,
      help="PTE Eq. 6, S = Normalize(S + w S'): literal (default: the paper as written, w = 1), scaled "
      "(w = 1/(m sqrt(d_kv))), unit, gated, unit_gated (README choice 8)")
    a("--fold-keys", default=d.fold_keys, choices=FOLD_KEYS,
      help="PTE Eq. 4 folds the evicted keys as cached (rotated, post-RoPE) or with RoPE undone (unrotated)")
    a("--seed", type=int, default=d.seed, help="seeds adapter init, data order and every rollout generator")
    a("--out", default=d.out, help="output folder: log.jsonl, config.json, curves.png, ckpt-NNNNNN/")
    a("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (and at the last step)")
    a("--keep", type=int, default=d.keep, help="keep the last K checkpoints")
    a("--resume", action="store_true", help="continue exactly from the latest checkpoint in --out")
    a("--dtype", default=None, choices=["float32", "bfloat16", "float64"], help="model dtype (default: "
      "bf16 on CUDA, fp32 on CPU; float64 for exactness checks); adapters and AdamW state stay fp32")
    a("--device", default=None, help="cuda, cuda:1, cpu "
      "(default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    a("--log-samples", type=int, default=d.log_samples, help="decoded samples per step in log.jsonl")
    a("--plot", nargs="+", metavar="RUN", help="only draw the training curves of these run folders into "
      "curves.png in their common parent folder, and exit")
    args = ap.parse_args(argv)
    cfg = GRPOConfig(**{f.name: getattr(args, f.name) for f in fields(GRPOConfig)})
    return cfg, args.resume, args.plot


def main(argv=None):
    cfg, resume, plot = parse_args(argv)
    rank = 0
    try:
        if plot:
            missing = [r for r in plot if not (Path(r) / "log.jsonl").is_file()]
            if missing:
                raise GRPOError(f"no log.jsonl in {missing[0]}")
            where = Path(plot[0]) if len(plot) == 1 else \
                Path(os.path.commonpath([os.path.abspath(r) for r in plot]))
            print(f"wrote {plot_runs(plot, where / 'curves.png')}")
            return 0
        rank, world, device = init_distributed()
        train(cfg, resume, rank, world, device)
        return 0
    except (data.DataError, ModelError, AdapterError, CheckpointError, GRPOError) as e:
        print(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: continue with the same command plus --resume "
              f"(from the latest ckpt in {cfg.out})", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
