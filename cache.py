"""
cache.py: the KV cache of the paper's cache policy D (Section 3, Eq. 1; README choices 2-3).

One object holds the keys and values of every layer for a batch of sequences, in preallocated buffers:

    slots [0, P)        the (left-padded) prompt, pinned: never evicted ("question tokens are never evicted")
    slots [P, P + W)    a ring of W thought slots (mode "window"), or P + max_new slots (mode "full")

Eviction rule (policy D). Before a new thought token is appended, if the cache already holds W thought tokens,
the oldest E = ceil(W/4) thought tokens are evicted first, in one bulk event. The schedule depends only on the
number of generated tokens, so it is the same for every sequence of a batch and can be replayed exactly under
teacher forcing: events happen before thought tokens t = W, W+E, W+2E, ...  `evict()` returns the evicted keys
and values of every layer (with their positions) so that PTE (pte.py) can fold them into its state S.

Positions. Every token keeps its original absolute position (no StreamingLLM re-indexing; paper silent,
README choice 3). Keys are stored after RoPE, so nothing is ever re-rotated. Worked example with a
prompt of 3 tokens (positions 0,1,2), W = 4, E = ceil(4/4) = 1:

    after prefill and thought tokens t0..t3:  prompt [0 1 2]  ring [3 4 5 6]      (4 thoughts held: full)
    feeding t4 (position 7): evict t0 first   prompt [0 1 2]  ring [7 4 5 6]      (t0 at position 3 went to S)
    feeding t5 (position 8): evict t1 first   prompt [0 1 2]  ring [7 8 5 6]

The query of t5 attends to positions {0,1,2, 5,6,7, 8}: the prompt, the retained window and itself. Slot order
does not matter to attention; the mask is built from positions alone: a query at position p sees a slot iff
the slot is occupied and its position is <= p. Empty, evicted and padding slots hold position EMPTY (a huge
number), so one comparison `slot_pos <= q_pos` is the whole mask.

Memory in window mode is fixed at construction: no allocation per step and no torch.cat per token.

Static decode (model.decode_one_token, replayed as a CUDA graph): `prepare_static` is `prepare(1)` with fixed
shapes and no Python number that changes per step: the thought index is a device tensor, the write slot and
the position are computed from it on the device, and attention spans a fixed number of slots chosen by the
caller (all P + W in window mode; the used prefix rounded up to a bucket in full mode). A replayed graph runs
no Python, so the host counters that drive eviction are advanced separately (`advance`).
"""
import math

import torch

EMPTY = 2 ** 62  # position of a slot that holds nothing: never <= any query position


def n_evict(window: int) -> int:
    """Tokens evicted per event: 25% of the thought window
    (paper: "25% of tokens are evicted"; README choice 2)."""
    return math.ceil(window / 4)


def eviction_steps(window, n_tokens):
    """The schedule of the rule above in closed form: the thought indices t before whose feeding an eviction
    event happens, W, W+E, W+2E, ... (< n_tokens); none in full mode (window None). Replay segments on it
    (pte.py)."""
    if window is None:
        return []
    return list(range(window, n_tokens, n_evict(window)))


def parse_window(s, also=()):
    """A --window value (every CLI): a positive int W, 'full' (-> None: the full cache), or one of `also`,
    returned as given. Anything else is a ValueError with a one-line message."""
    if s is None or s in also:
        return s
    if isinstance(s, str) and s.strip().lower() == "full":
        return None
    choices = " or ".join(["a positive integer", "'full'", *(repr(a) for a in also)])
    try:
        w = int(s)
    except (TypeError, ValueError):
        raise ValueError(f"--window must be {choices} (got {s!r})") from None
    if w < 1:
        raise ValueError(f"--window must be {choices} (got {w})")
    return w


class KVCache:
    def __init__(self, n_layers, prompt_lens, n_kv_heads, head_dim, max_new_tokens, window=None,
                 dtype=torch.float32, device="cpu"):
        """prompt_lens: (B,) real prompt lengths; prompts are left-padded to P = max(prompt_lens).
        window: thought slots W (mode "window"), or None for mode "full" (capacity P + max_new_tokens)."""
        self.prompt_lens = torch.as_tensor(prompt_lens, dtype=torch.long, device=device)  # (B,)
        B, P = len(self.prompt_lens), int(self.prompt_lens.max())
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 (got {window})")
        self.window, self.P = window, P
        self.mode = "full" if window is None else "window"
        self.W = max_new_tokens if window is None else window  # thought slots
        n_slots = P + self.W
        self.k = torch.zeros(n_layers, B, n_kv_heads, n_slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        # position held by each slot
        self.slot_pos = torch.full((B, n_slots), EMPTY, dtype=torch.long, device=device)
        self.n_fed = 0          # tokens fed so far: prompt slots first (P of them), then thought tokens
        self.n_evicted = 0      # thought tokens evicted so far
        self.slots = None       # slots of the chunk being written (set by prepare, read by update)
        self.n_used = 0         # slots attention reads: the used prefix [0, n_used) (set by prepare)
        self.prompt_graph = self.prompt_leaves = None  # replay only: see keep_prompt_graph

    @property
    def n_thought(self):  # thought tokens appended so far
        return max(self.n_fed - self.P, 0)

    @property
    def n_held(self):  # thought tokens currently in the ring
        return self.n_thought - self.n_evicted

    def needs_evict(self) -> bool:
        return self.mode == "window" and self.n_thought > 0 and self.n_held >= self.W

    def evict(self):
        """Evict the oldest E thought tokens. Returns (K_e, V_e, pos_e): (L, B, H_kv, E, D) x 2 and (B, E)."""
        E = n_evict(self.W)
        t = torch.arange(self.n_evicted, self.n_evicted + E, device=self.k.device)
        slots = self.P + t % self.W
        K_e, V_e, pos_e = self.k[:, :, :, slots], self.v[:, :, :, slots], self.slot_pos[:, slots]  # copies
        self.slot_pos[:, slots] = EMPTY
        self.n_evicted += E
        return K_e, V_e, pos_e

    def check_room(self, n_new):
        """n_new more thought tokens must fit beside the ones held."""
        if self.n_held + n_new > self.W:
            raise RuntimeError(f"cache holds {self.W} thought tokens; "
                               "evict() first (window) or size it larger (full)")

    def prepare(self, T):
        """Reserve slots for the next T tokens.
        Returns (q_pos (B, T) for RoPE, mask (B, 1, T, n_used) bool)."""
        dev = self.k.device
        # index in the [padded prompt; thoughts] stream
        i = torch.arange(self.n_fed, self.n_fed + T, device=dev)
        is_prompt = i < self.P
        t = (i - self.P).clamp(min=0)  # thought index
        # thought tokens in this chunk (no host sync)
        n_new = T - max(0, min(self.P, self.n_fed + T) - self.n_fed)
        self.check_room(n_new)
        self.slots = torch.where(is_prompt, i, self.P + t % self.W)
        pad = (self.P - self.prompt_lens)[:, None]  # (B, 1) left padding of each prompt
        pos = torch.where(is_prompt, i - pad, self.prompt_lens[:, None] + t)  # (B, T) absolute positions
        real = pos >= 0  # padding slots stay EMPTY
        self.slot_pos[:, self.slots] = torch.where(real, pos, EMPTY)
        self.n_fed += T
        # slots fill in stream order, [0, P + W): attend over the used prefix only (all slots once the
        # ring wrapped)
        self.n_used = min(self.n_fed, self.P + self.W)
        # a padding query sits at position 0 and sees the first real token: finite, unused
        q_pos = pos.clamp(min=0)
        mask = self.slot_pos[:, None, None, :self.n_used] <= q_pos[:, None, :, None]
        return q_pos, mask

    def prepare_static(self, t, n_attend):
        """prepare(1) for the static decode step: t (1,) device tensor, the thought index of the token fed
        (its slot is P + t % W; full mode: W = max_new_tokens, so P + t); attention over slots [0, n_attend),
        a Python int fixed per captured graph. No host sync and no shape that depends on t.
        Returns (q_pos (B, 1), mask)."""
        self.slots = self.P + t % self.W
        pos = self.prompt_lens[:, None] + t  # (B, 1): thought positions continue each real prompt
        self.slot_pos.index_copy_(1, self.slots, pos)
        self.n_used = n_attend
        return pos, self.slot_pos[:, None, None, :n_attend] <= pos[:, None, :, None]

    def advance(self, T=1):
        """The host side of prepare_static: count T more fed tokens (drives needs_evict/evict), before the
        step."""
        self.check_room(T)
        self.n_fed += T

    def keep_prompt_graph(self):
        """Replay (pte.replay), before the prefill: the next chunk must be the whole prompt. Its K/V keep
        their autograd graph in `prompt_graph` (one (k, v) per layer), and every later chunk attends to leaf
        copies of them (`prompt_leaves`) whose .grad the caller pushes through the prompt once, at the end.
        So a thought token's loss reaches the adapters through the prompt's K/V from every segment, while the
        thought K/V carried between segments stay detached (README choice 10)."""
        if self.n_fed:
            raise RuntimeError("keep_prompt_graph() must come before the prompt is fed")
        self.prompt_graph, self.prompt_leaves = [], []

    def update(self, layer, k, v):
        """Write this chunk's (post-RoPE) k, v (B, H_kv, T, D) into layer `layer`;
        return the layer's full K, V. Under autograd (replay), the buffer keeps detached copies and the
        returned K, V carry the chunk's graph (and the prompt leaves' after keep_prompt_graph)."""
        self.k[layer].index_copy_(2, self.slots, k.detach())
        self.v[layer].index_copy_(2, self.slots, v.detach())
        K, V = self.k[layer, :, :, :self.n_used], self.v[layer, :, :, :self.n_used]
        if self.prompt_leaves is not None and torch.is_grad_enabled():
            if self.n_fed == self.P:  # this chunk is the prompt
                self.prompt_graph.append((k, v))
                self.prompt_leaves.append((k.detach().requires_grad_(), v.detach().requires_grad_()))
            else:
                k_p, v_p = self.prompt_leaves[layer]
                K, V = torch.cat([k_p, K[:, :, self.P:]], 2), torch.cat([v_p, V[:, :, self.P:]], 2)
        # out-of-place: a copy of prompt + window, bounded by the window
        if k.requires_grad or v.requires_grad:
            K, V = K.index_copy(2, self.slots, k), V.index_copy(2, self.slots, v)
        return K, V

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.slot_pos))
