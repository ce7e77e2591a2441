"""How close is replay's gradient to the exact one? (README choice 10)

pte.replay cuts the graph at segment borders: the thought K/V that a segment attends to, and the evicted
K/V folded into S, are detached copies, so a loss at token t does not reach the adapters through the
keys/values of earlier segments' tokens. The exact gradient keeps every path. Here both are computed on a
small random model in float64 (so the comparison measures the truncation, not rounding), with random
adapters and sampled completions, and compared by cosine over all adapter parameters, per method.

The exact gradient: the same forward (prefill, then segment by segment, evict -> fold -> feed), one autograd
graph, with a cache that keeps every key and value with its graph (ExactCache) and evicted K/V that carry
theirs into Eq. 4. Memory O(everything): fine on this toy, the reason replay truncates on a real one.

    python experiments/replay_grad.py            # -> experiments/replay_grad.json
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cache import KVCache, eviction_steps, n_evict  # noqa: E402
from model import ModelConfig, Transformer, generate, left_pad  # noqa: E402
from pte import AdapterConfig, Adapters, replay, token_logprobs  # noqa: E402


class ExactCache(KVCache):
    """KVCache whose keys and values keep their autograd graph (functional updates, nothing detached)."""
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.kg, self.vg = list(self.k.unbind(0)), list(self.v.unbind(0))

    def update(self, layer, k, v):
        self.kg[layer] = self.kg[layer].index_copy(2, self.slots, k)
        self.vg[layer] = self.vg[layer].index_copy(2, self.slots, v)
        return self.kg[layer][:, :, :self.n_used], self.vg[layer][:, :, :self.n_used]

    def evict(self):
        slots = self.P + torch.arange(self.n_evicted, self.n_evicted + n_evict(self.W)) % self.W
        _, _, pos_e = super().evict()
        K_e, V_e = (torch.stack([x[:, :, slots] for x in xs]) for xs in (self.kg, self.vg))
        return K_e, V_e, pos_e


def exact_loss(model, ad, prompts, tokens, window, weights):
    idx, plens = left_pad(prompts, 0, "cpu")
    B, T = tokens.shape
    p = next(model.parameters())
    cache = ExactCache(model.cfg.n_layers, plens, model.cfg.n_kv_heads, model.cfg.head_dim, T, window,
                       dtype=p.dtype)
    ad.reset(B)
    h = model(idx, cache, hidden_only=True)[:, -1:]
    total = (token_logprobs(model, h, tokens[:, :1]) * weights[:, :1]).sum()
    bounds = [0] + eviction_steps(window, T - 1) + [T - 1]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if cache.needs_evict():
            ad.fold(*cache.evict())
        h = model(tokens[:, a:b], cache, hidden_only=True)
        total = total + (token_logprobs(model, h, tokens[:, a + 1:b + 1]) * weights[:, a + 1:b + 1]).sum()
    total.backward()
    ad.activate(None)
    ad.S = None


def flat_grad(ad):
    return torch.cat([p.grad.flatten() for p in ad.parameters()])


def measure(method, window, seed, n_new, hidden):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="qwen2", vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                      n_layers=2, n_heads=4, n_kv_heads=2, head_dim=hidden // 4, rms_norm_eps=1e-6,
                      rope_theta=10000.0, rope_scaling=None, attention_bias=True, tie_word_embeddings=False)
    model = Transformer(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
            p.requires_grad_(False)
    ad = Adapters(model, AdapterConfig(method=method, rank=4, n_global=4))
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (6, 9, 7)]
    W = None if method == "lora" else window
    out = generate(model, prompts, n_new, [], temperature=1.0, window=W, adapter=ad, generator=g)
    weights = torch.randn(out.tokens.shape, generator=g, dtype=torch.float64)  # a loss with signal everywhere
    ad.zero_grad(set_to_none=True)
    loss_fn = lambda lp, t0, t1: (lp * weights[:, t0:t1]).sum()  # noqa: E731
    replay(model, ad, prompts, out.tokens, window=W, loss_fn=loss_fn)
    g_replay = flat_grad(ad)
    ad.zero_grad(set_to_none=True)
    exact_loss(model, ad, prompts, out.tokens, W, weights)
    g_exact = flat_grad(ad)
    return float(torch.nn.functional.cosine_similarity(g_replay, g_exact, dim=0)), int(out.evictions.max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "replay_grad.json"))
    args = ap.parse_args()
    rows = []
    for method in ("lora", "lora_c", "pte"):
        cos = [measure(method, args.window, s, args.new_tokens, args.hidden) for s in range(args.seeds)]
        rows.append(dict(method=method, window=None if method == "lora" else args.window,
                         events=cos[0][1], cos=[round(c, 4) for c, _ in cos],
                         mean=round(sum(c for c, _ in cos) / len(cos), 4)))
        print(f"{method:7s} W={rows[-1]['window']!s:5s} events {rows[-1]['events']:3d}   "
              f"cos(replay, exact) mean {rows[-1]['mean']:.3f}   per seed {rows[-1]['cos']}")
    Path(args.out).write_text(json.dumps(dict(vars(args), rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
