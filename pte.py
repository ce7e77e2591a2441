"""
pte.py: Progressive Thought Encoding (paper Section 3, Eqs. 4-7), plain LoRA, and replayed log-probs.

Three methods behind one switch, as in the paper's Table 1 (the base model is frozen; only adapters train):
    lora    static LoRA, full KV cache                      (the memory-hungry baseline)
    lora_c  static LoRA under the sliding-window cache      (naive cache truncation)
    pte     LoRA whose core is a per-layer state S that absorbs every evicted thought token

PTE, per layer l and per sequence (shapes with d_kv = n_kv_heads * head_dim, r = LoRA rank;
README choices 4-5):
    q_g (r, d_kv)  learnable global query          W_Q_a, W_K_a, W_V_a (r, d_kv)  projections d_kv -> r
    k_g, v_g (n_g, d_kv)  learnable global tokens
    S0 = Normalize((W_Q_a q_g)(W_K_a k_g)^T (W_V_a v_g))      Eq. 7   (n_g = 0  =>  S0 = 0)
    at each eviction event with evicted K_e, V_e (m, d_kv):
    S' = (W_Q_a q_g)(W_K_a K_e)^T (W_V_a V_e)                  Eq. 4   (r, r)
    S  = Normalize(S + S')                                     Eq. 6   (flags: LayerAdapter.update)
    y  = W x + (alpha/r) A S B x,   A (d_out, r), B (r, d_in)  Eq. 5   (Delta W = A S B, never materialised)
Plain LoRA is the same adapter with S = I (y = W x + (alpha/r) A B x).

Replay (README choice 10): GRPO needs log pi(y_t) with gradients, under the same cache policy and the same S
as the rollout. `replay` is generate's loop with the sampled tokens fed back: prefill the prompt, then per
segment (the tokens between two eviction events) evict -> fold -> feed; each segment attends to the prompt,
the retained window and its own earlier tokens. Thought K/V carried into a later segment, and evicted K/V, are
detached (truncated BPTT). The prompt's K/V and the tiny chain of states S stay differentiable: every segment
runs on leaf copies of both and is backpropagated at once; at the end one backward pushes the prompt leaves'
gradients through the prompt, and one pushes the S leaves' through the S chain into W_Q_a, W_K_a, W_V_a, q_g,
k_g, v_g. Peak memory: prompt + window.

    from pte import AdapterConfig, Adapters, replay
    adapters = Adapters(model, AdapterConfig(method="pte", rank=32))
    out = generate(model, prompts, 3072, tok.stop_ids, temperature=1.0, window=1024, adapter=adapters)
    logp = replay(model, adapters, prompts, out.tokens, window=1024, temperature=1.0, loss_fn=...)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cache import eviction_steps
from model import apply_rope, left_pad, logprob_dtype, rope_cos_sin

METHODS = ("lora", "lora_c", "pte")
STATE_UPDATES = ("literal", "unit", "scaled", "gated", "unit_gated")
FOLD_KEYS = ("rotated", "unrotated")
TARGETS = {"qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
           "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


class AdapterError(ValueError):
    """Bad adapter input (unknown method, mismatched base model, unreadable files). One-line message."""


@dataclass
class AdapterConfig:
    method: str = "pte"           # lora | lora_c | pte
    rank: int = 32                # r, the same for every method (fair comparison; paper: 32)
    # LoRA scale alpha/r; paper silent, None => alpha = r, scale 1 (README choice 9)
    alpha: float | None = None
    # qkvo | all-linear; paper silent (README choice 5), same set for every method
    targets: str = "qkvo"
    n_global: int = 32            # global tokens n_g seeding S0 (Eq. 7); 0 => S0 = 0 (ablation "#Global-0")
    global_only: bool = False     # ablation "Global-Only": S stays S0, evictions are not folded in
    # Eq. 4 with softmax(Q K^T / sqrt(r)) V: a stability variant, not the paper's form
    state_softmax: bool = False
    # Eq. 6's Normalize, undefined in the paper: row-wise L2 (README choice 7) | frobenius | none
    normalize: str = "row"
    # Eq. 6's S' weight: literal | scaled | unit | gated | unit_gated (README choice 8)
    state_update: str = "literal"
    gate_init: float = 0.25        # unit_gated: initial weight of Normalize(S') against the normalised S
    # keys folded by Eq. 4: rotated (as cached, post-RoPE) | unrotated (RoPE undone)
    fold_keys: str = "rotated"

    def __post_init__(self):
        if self.method not in METHODS:
            raise AdapterError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.targets not in TARGETS:
            raise AdapterError(f"unknown targets {self.targets!r} (choose from {', '.join(TARGETS)})")
        if self.rank < 1 or self.n_global < 0:
            raise AdapterError("rank must be >= 1 and n_global >= 0")
        if self.alpha is None:
            self.alpha = float(self.rank)
        if self.normalize not in ("row", "frobenius", "none"):
            raise AdapterError(f"unknown normalize {self.normalize!r} (row, frobenius, none)")
        if self.state_update not in STATE_UPDATES:
            raise AdapterError(f"unknown state_update {self.state_update!r} ({', '.join(STATE_UPDATES)})")
        if self.fold_keys not in FOLD_KEYS:
            raise AdapterError(f"unknown fold_keys {self.fold_keys!r} ({', '.join(FOLD_KEYS)})")


# -----------------------------------------------------------------------------------------------------------
# LoRA factors and the adapted linear layer (Eq. 5)

def adapter_dtype(model_dtype):
    """Adapter parameters (and so their gradients and AdamW's state) are fp32 even on a bf16 model: an update
    of lr 1e-5 is mostly below bf16's resolution, and a bf16 .grad summed over ~2k segment backward calls per
    step loses several percent of the gradient. fp64 models (exactness tests) get fp64 adapters."""
    return torch.promote_types(model_dtype, torch.float32)


class LoRA(nn.Module):
    def __init__(self, d_in, d_out, r):
        super().__init__()
        # zero: the adapted model equals the base at step 0 (README choice 9)
        self.A = nn.Parameter(torch.zeros(d_out, r))
        self.B = nn.Parameter(torch.empty(r, d_in))
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))


class LoRALinear(nn.Module):
    """Replaces a frozen nn.Linear: y = W x + scale * A S B x, with S the layer's current (B, r, r) state or
    None."""
    def __init__(self, base: nn.Linear, lora: LoRA, layer_adapter, scale):
        super().__init__()
        self.base, self.scale = base, scale
        # a tuple, so the adapter's parameters are not registered in the model
        self._refs = (lora, layer_adapter)

    def forward(self, x):  # x (B, T, d_in)
        lora, la = self._refs
        y = self.base(x)
        if not la.enabled:
            return y
        # adapters are kept in fp32 and cast to the activations' dtype here (the casts are differentiable,
        # so their .grad accumulates in fp32 over every segment and micro-batch, never in bf16)
        h = x @ lora.B.T.to(x.dtype)                       # (B, T, r)
        if la.S_active is not None:
            h = h @ la.S_active.transpose(1, 2).to(x.dtype)  # row form of S (B x): each sequence its own S
        return y + self.scale * (h @ lora.A.T.to(x.dtype))


class LayerAdapter(nn.Module):
    """One decoder layer's adapters: a LoRA per target module and, for PTE, the context-state encoder."""
    def __init__(self, cfg: AdapterConfig, shapes: dict, d_kv: int):
        super().__init__()
        self.cfg, r = cfg, cfg.rank
        self.lora = nn.ModuleDict({name: LoRA(d_in, d_out, r) for name, (d_in, d_out) in shapes.items()})
        self.enabled, self.S_active = True, None
        if cfg.method == "pte":
            # global query (README choice 9: N(0, 0.02^2))
            self.q_g = nn.Parameter(torch.randn(r, d_kv) * 0.02)
            self.k_g = nn.Parameter(torch.randn(cfg.n_global, d_kv) * 0.02)  # global tokens (Eq. 7)
            self.v_g = nn.Parameter(torch.randn(cfg.n_global, d_kv) * 0.02)
            self.W_Q_a, self.W_K_a, self.W_V_a = (nn.Parameter(nn.init.xavier_uniform_(torch.empty(r, d_kv)))
                                                  for _ in range(3))
            self.d_kv = d_kv
            if cfg.state_update in ("gated", "unit_gated"):  # learnable per-layer log-weight of S', init 0
                self.log_gate = nn.Parameter(torch.zeros(()))

    def normalize(self, S):  # Eq. 6; paper silent: row-wise L2 keeps |S| bounded over any number of events
        if self.cfg.normalize == "row":
            return F.normalize(S, dim=-1, eps=1e-6)
        if self.cfg.normalize == "frobenius":
            return S * (math.sqrt(S.shape[-1]) / S.flatten(1).norm(dim=-1).clamp_min(1e-6))[:, None, None]
        return S

    def encode(self, K_e, V_e):
        """Eq. 4: K_e, V_e (B, m, d_kv) -> S' = Q (K_e W_K_a^T)^T (V_e W_V_a^T) (B, r, r), Q = W_Q_a q_g."""
        Q = self.q_g @ self.W_Q_a.T  # (r, r): one row per global-query vector
        if not self.cfg.state_softmax and not K_e.requires_grad:
            # evicted K/V (the global tokens k_g, v_g carry grad): the last line's value, with less memory
            return _LinearState.apply(Q, self.W_K_a, self.W_V_a, K_e, V_e)
        Kp, Vp = K_e @ self.W_K_a.T, V_e @ self.W_V_a.T  # (B, m, r)
        if self.cfg.state_softmax:  # the variant (README choice 6), not the paper's form
            return torch.softmax(Q @ Kp.transpose(1, 2) / math.sqrt(Q.shape[-1]), -1) @ Vp
        return Q @ (Kp.transpose(1, 2) @ Vp)

    def update(self, S, K_e, V_e):
        """Eq. 6, one event: S (B, r, r), evicted K_e, V_e (B, m, d_kv) -> Normalize(S + w * S'), S' = Eq. 4.

        Why the default is the paper's w = 1 ("literal"), and why "scaled", w = 1 / (m sqrt(d_kv)), exists.
        S is row-normalised, S' is not. On real Qwen weights one event (m = 192) gives S' row norms 77-676, so
        the literal S_after ~ Normalize(S') (cos >= 0.998): there, every event would overwrite the state.
        Evidence from the toy recall task (experiments/recall.py -> recall.json; 2 layers, d_kv = 32, r = 8,
        150 steps, lr 1e-3; one seed, +-0.03):
        - What carries the secret is the SUM S + S', not the chain "S shapes the next K/V, folded next". With
          S read only at the query (evicted K/V never depend on S: probe `cut`) recall is 1.00 at 10 events
          after the secret; keeping only the chain (S = Normalize(S0 + S'): probe `reset`) gives chance
          (0.09); k/v adapters on S0 (probe `kv_S0`) 0.90.
        - literal carries it furthest at the scales we can train (replay before README choice 10's prompt
          leaves; rerun after: literal 1.00 / 1.00 / 0.98 / 0.84, scaled 0.90 / 0.74 / 0.52 / 0.88):
          1.00 / 1.00 / 0.99 / 0.92 at 1 / 3 / 10 / 30
          events (W = 8, m = 2, S' rows ~0.2, cos(S_after, S_before) ~0.97); scaled 0.97 / 0.93 / 0.93 / 0.89;
          unit (every event weighs as much as all of S) 0.69 / 0.13 at 3 / 10;
          unit_gated 0.45 / 0.07 at 10 / 30; softmax 0.10 at 10. lr sweep at 10 events (3e-4 / 1e-3 / 3e-3):
          literal 0.39 / 0.99 / 1.00, scaled 0.12 / 0.93 / 1.00. Under GRPO (demo.py at tests/test_demo.py's
          settings, lr 3e-3) literal reaches 0.70, scaled 0.21 (chance 0.10): scaled's S' starts ~10x
          smaller and needs a larger lr.
        - Where literal breaks: at real-weight magnitudes (S' x 300 on the toy) it is at chance from 3 events
          on (0.21 / 0.10 / 0.11), and at W = 64 (m = 16, rows ~1.6) it is 0.94 at 3 events, 0.10 at 10.
          scaled divides out m and d_kv (real rows 77-676 become 0.03-0.22) and keeps S' per-token strength;
          one real-sized event keeps cos(S_after, S_before) = 0.985 under scaled, -0.09 under literal. On real
          weights (Qwen2.5-Coder-0.5B, fresh adapters, m = 192 MATH500 tokens): S' rows 150-2243, cos(S_after,
          S_before) median 0.015 under literal, 0.998 under scaled. So on a real model with W in the hundreds,
          compare --state-update scaled (with a larger adapter lr) against literal before a long run.
        - gated (scaled times a learned exp(log_gate), init 1) stayed within 10% of init (Adam moves the log
          by ~lr per step) and matched scaled (0.93 at 10 events). Unrotated keys:
          literal 0.99 at 10 (= rotated).
        state_update chooses w:  literal  w = 1 (the paper as written; default)
                                 scaled   w = 1 / (m sqrt(d_kv))
                                 unit     S' replaced by Normalize(S') (same Normalize as S)
                                 gated    w = exp(log_gate) / (m sqrt(d_kv)), log_gate learnable per layer,
                                          init 0
                                 unit_gated  Normalize(S') weighted by gate_init * exp(log_gate)
        With state_softmax, S' is an average over the m tokens, not a sum; the old softmax variant is
        state_softmax=True with state_update="literal"."""
        Sp = self.encode(K_e, V_e)
        mode, m = self.cfg.state_update, K_e.shape[1]
        if mode == "unit":
            Sp = self.normalize(Sp)
        elif mode == "scaled":
            Sp = Sp / (m * math.sqrt(self.d_kv))
        elif mode == "gated":
            Sp = Sp * (self.log_gate.exp() / (m * math.sqrt(self.d_kv)))
        elif mode == "unit_gated":
            Sp = self.normalize(Sp) * (self.cfg.gate_init * self.log_gate.exp())
        return self.normalize(S + Sp)

    def initial_state(self, B):
        r, p = self.cfg.rank, self.q_g
        if self.cfg.n_global == 0:
            return p.new_zeros(B, r, r)
        return self.normalize(self.encode(self.k_g[None], self.v_g[None])).expand(B, r, r)  # Eq. 7


class _LinearState(torch.autograd.Function):
    """Eq. 4 for evicted K/V: the same value as LayerAdapter.encode's plain form,
    S' = Q (K_e W_K^T)^T (V_e W_V^T), with less memory. Autograd would save K_e and V_e ((m, d_kv) per event:
    the whole evicted KV stream over a replay); this saves only (r, d_kv) statistics per event
    (README choice 10)."""
    @staticmethod
    def forward(ctx, Q, W_K, W_V, K_e, V_e):  # Q (r, r); W_K, W_V (r, d); K_e, V_e (B, m, d), no grad
        Kp, Vp = K_e @ W_K.T, V_e @ W_V.T     # (B, m, r)
        C = Kp.transpose(1, 2) @ Vp           # (B, r, r)
        ctx.save_for_backward(Q, C, Vp.transpose(1, 2) @ K_e, Kp.transpose(1, 2) @ V_e)  # X, Y (B, r, d)
        return Q @ C

    @staticmethod
    def backward(ctx, gS):  # gS (B, r, r)
        Q, C, X, Y = ctx.saved_tensors
        gC = Q.T @ gS                                   # dL/dC
        gQ = (gS @ C.transpose(1, 2)).sum(0)
        gW_K = (gC @ X).sum(0)                          # dL/dKp = Vp gC^T  ->  dL/dW_K = gC Vp^T K_e
        gW_V = (gC.transpose(1, 2) @ Y).sum(0)          # dL/dVp = Kp gC    ->  dL/dW_V = gC^T Kp^T V_e
        return gQ, gW_K, gW_V, None, None


class Adapters(nn.Module):
    """Wraps the target linears of `model` in place (base stays frozen) and owns every trainable parameter.
    Also the `adapter` object model.generate() drives: reset(B) before prefill, fold(K_e, V_e) per
    eviction."""
    def __init__(self, model, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        mc = model.cfg
        d_kv = mc.n_kv_heads * mc.head_dim
        self.layers = nn.ModuleList()
        for block in model.model.layers:
            owners = {n: block.self_attn if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                         else block.mlp
                      for n in TARGETS[cfg.targets]}
            lins = {n: getattr(o, n) for n, o in owners.items()}
            if any(not isinstance(lin, nn.Linear) for lin in lins.values()):
                raise AdapterError("model already has adapters attached")
            la = LayerAdapter(cfg, {n: (lin.in_features, lin.out_features) for n, lin in lins.items()}, d_kv)
            self.layers.append(la)
            for n, lin in lins.items():
                setattr(owners[n], n, LoRALinear(lin, la.lora[n], la, cfg.alpha / cfg.rank))
        p = next(model.parameters())
        self.to(device=p.device, dtype=adapter_dtype(p.dtype))
        self.register_buffer("inv_freq", model.inv_freq.clone(), persistent=False)  # to undo RoPE (fold_keys)
        self.S = None  # the chain of states (one (B, r, r) per layer) of the sequence batch being processed
        self.S_buffers = None  # no_grad generation: S lives here, updated in place (a CUDA graph reads these)
        self.base_cfg, self.base_name = model.cfg, getattr(model, "name_or_path", None)  # for checkpoint.py

    @property
    def is_pte(self):
        return self.cfg.method == "pte"

    def set_enabled(self, on: bool):  # off = the frozen base model (the KL reference)
        for la in self.layers:
            la.enabled = on

    def activate(self, states):
        """The S each LoRALinear reads. None: lora/lora_c read none (plain LoRA); PTE layers read S0 (Eq. 7),
        the state before any eviction, so a forward outside generate/replay (or after a replay) is still
        PTE's."""
        if states is None and self.is_pte:
            with torch.no_grad():
                states = [la.initial_state(1) for la in self.layers]
        for la, S in zip(self.layers, states or [None] * len(self.layers)):
            la.S_active = S

    def reset(self, B):
        """State is per rollout: reset for every sequence (S and Delta W never carry over between prompts)."""
        self.S = [la.initial_state(B) for la in self.layers] if self.is_pte else None
        self.settle()

    def fold(self, K_e, V_e, pos_e=None):
        """One eviction event. K_e, V_e (L, B, H_kv, E, D), pos_e (B, E) from cache.evict(); heads
        concatenated (README choice 5). The cache holds post-RoPE keys; fold_keys="unrotated" rotates them
        back by -pos_e first (the global query q_g has no position), and then needs pos_e."""
        if not self.is_pte or self.cfg.global_only:
            return
        L, B, H, E, D = K_e.shape
        if self.cfg.fold_keys == "unrotated":
            if pos_e is None:
                raise AdapterError("fold_keys='unrotated' needs the evicted positions: fold(K_e, V_e, pos_e)")
            cos, sin = rope_cos_sin(self.inv_freq, pos_e.to(self.inv_freq.device), K_e.dtype)  # (B, 1, E, D)
            K_e = apply_rope(K_e, cos, -sin)  # rotation by -pos: the inverse of the cache's RoPE
        # the state is computed in the adapters' dtype (fp32 on a bf16 model)
        dt = next(self.parameters()).dtype
        flat = lambda X: X.transpose(2, 3).reshape(L, B, E, H * D).to(dt)  # (L, B, E, d_kv)
        K_e, V_e = flat(K_e), flat(V_e)
        self.S = [la.update(S, K_e[i], V_e[i]) for i, (la, S) in enumerate(zip(self.layers, self.S))]
        self.settle()

    def settle(self):
        """Activate the new S. Under no_grad (generation) it is copied into fixed per-layer buffers that
        LoRALinear reads, so the captured decode step (model.GraphedStep) sees every fold; with autograd
        (replay) the chain itself is activated."""
        if self.S is not None and not torch.is_grad_enabled():
            if self.S_buffers is None or any(b.shape != S.shape or b.dtype != S.dtype or b.device != S.device
                                             for b, S in zip(self.S_buffers, self.S)):
                self.S_buffers = [S.new_empty(S.shape) for S in self.S]
            for b, S in zip(self.S_buffers, self.S):
                b.copy_(S)
            self.S = self.S_buffers
        self.activate(self.S)


# -----------------------------------------------------------------------------------------------------------
# replay: log-probs of given completions, under the same method, window and eviction schedule as the rollout

def token_logprobs(model, h, targets, temperature=1.0, chunk=256):
    """h (B, n, d) final hidden states, targets (B, n) -> log pi(target) (B, n), fp32. Full-vocabulary logits
    exist for `chunk` positions at a time only; under autograd each chunk is recomputed in backward."""
    lm_head = model.lm_head.weight
    temp = temperature if temperature > 0 else 1.0

    def f(h_c, t_c):
        logits = (h_c @ lm_head.T).to(logprob_dtype(h_c.dtype))
        return torch.log_softmax(logits / temp, -1).gather(-1, t_c[..., None])[..., 0]

    out = []
    for i in range(0, h.shape[1], chunk):
        h_c, t_c = h[:, i:i + chunk], targets[:, i:i + chunk]
        out.append(checkpoint(f, h_c, t_c, use_reentrant=False) if h_c.requires_grad else f(h_c, t_c))
    return torch.cat(out, 1)


def replay(model, adapters, prompts, tokens, window=None, temperature=1.0, loss_fn=None, pad_id=0):
    """Recompute log pi(y_t | C_t^D) for completions `tokens` (B, T) after `prompts` (lists of ids).

    The loop of model.generate with the sampled tokens fed back in segments: prefill the prompt (its last
    position predicts y_0), then for each segment evict -> fold -> feed. window=None replays with the full
    cache (method lora: one segment, the baseline's cost). Without loss_fn it runs under no_grad; with
    loss_fn(logp_seg (B, n), t0, t1) -> scalar, each segment's loss is backpropagated as soon as it is
    computed (gradients accumulate in .grad), and at the end the leaves' gradients are pushed through the
    prompt's graph (with y_0's loss) and then through the S chain. Returns the detached log-probs (B, T)."""
    train = loss_fn is not None
    device = next(model.parameters()).device
    with torch.set_grad_enabled(train):
        idx, plens = left_pad(prompts, pad_id, device)
        tokens = tokens.to(device)
        B, T = tokens.shape
        cache = model.new_cache(plens, T, window)
        if train:
            cache.keep_prompt_graph()
        if adapters is not None:
            adapters.reset(B)
        chain, leaves = [], []  # PTE: the S of each segment, and the leaf copies the segment ran on

        def cut_chain():
            if train and adapters is not None and adapters.is_pte:
                chain.append(adapters.S)
                leaves.append([S.detach().requires_grad_() for S in adapters.S])
                adapters.activate(leaves[-1])

        cut_chain()
        h = model(idx, cache, hidden_only=True)[:, -1:]  # prefill: the prompt's last position predicts y_0
        out = [token_logprobs(model, h, tokens[:, :1], temperature)]
        loss_y0 = loss_fn(out[0], 0, 1) if train else None  # backpropagated with the prompt's graph, below
        # thought tokens 0..T-2 are fed; segment borders are the eviction events (before thought W, W+E, ...)
        bounds = [0] + eviction_steps(window, T - 1) + [T - 1]
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a == b:  # T == 1: nothing to feed
                continue
            if cache.needs_evict():
                K_e, V_e, pos_e = cache.evict()
                if adapters is not None:
                    adapters.fold(K_e, V_e, pos_e)
                    cut_chain()
            h = model(tokens[:, a:b], cache, hidden_only=True)  # feeds y_a..y_{b-1}, predicts y_{a+1}..y_b
            lp = token_logprobs(model, h, tokens[:, a + 1:b + 1], temperature)
            if train:
                loss_fn(lp, a + 1, b + 1).backward()
            out.append(lp.detach())
        if train:
            # 1. the prompt: y_0's loss and the gradients every segment left on the prompt's K/V leaves
            # (the prompt's graph reads the first S leaf, so this comes before the chain)
            pairs = [(g, l.grad) for gl, ll in zip(cache.prompt_graph, cache.prompt_leaves)
                     for g, l in zip(gl, ll) if g.requires_grad and l.grad is not None]
            pairs += [(loss_y0, None)] if loss_y0.requires_grad else []
            backward_pairs(pairs)
            # 2. the S chain: the leaves' gradients flow into the state encoder
            backward_pairs([(S, l.grad) for Ss, ls in zip(chain, leaves) for S, l in zip(Ss, ls)
                            if l.grad is not None and S.requires_grad])
        if chain:
            adapters.activate(None)
            adapters.S = None
    return torch.cat(out, 1).detach()


def backward_pairs(pairs):
    """One backward from several (tensor, gradient) pairs (gradient None for a scalar loss)."""
    if pairs:
        torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
