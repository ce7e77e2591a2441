"""Recall vs number of eviction events after the secret (issue: S' of Eq. 4 dwarfs the normalised S).

Task (tests/test_pte_remembers.py): prompt [BOS]; thought = secret digit, N filler tokens, QUERY,
answer = secret. W = 8, E = ceil(W/4) = 2 tokens per event; the secret (thought 0) leaves in the first event
(before thought 8). Events after the secret's eviction k = N/2 - 4 (N = 2k + 8): N = 20 gives 6, N = 60
gives 26.
A tiny base model is trained with the full cache (per N) and frozen; each variant trains its adapters by
teacher forcing through pte.replay with the same budget (steps x batch, Adam); accuracy as in the test (argmax
over the 10 digits of the replayed answer log-prob, 128 held-out samples).

Variants: the Eq. 6 forms (pte.AdapterConfig.state_update / fold_keys / state_softmax) and three mechanism
probes (monkeypatched here, not in pte.py):
    literal_x300  S = Normalize(S + 300 S'): the toy's S' rows are ~0.2, real Qwen's 77-676; this puts the toy
            in the real-weight regime where S' overwrites S at every event
    reset   S = Normalize(S0 + S'): nothing of S survives an event except through S' (the chain)
    kv_S0   the k_proj/v_proj adapters use S0, q/o use S: the state cannot shape the next K/V directly
    cut     every token uses S0 except the last segment (query): the evicted K/V never depend on S, so the
            only path from the secret to the query is the sum S <- Normalize(S + S')

    python experiments/recall.py --events 1 3 10 30 --variants literal unit ... --out experiments/recall.json
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model import ModelConfig, Transformer  # noqa: E402
from pte import AdapterConfig, Adapters, replay  # noqa: E402

BOS, QUERY, W = 30, 31, 8

VARIANTS = {  # name -> (method, AdapterConfig overrides, probe)
    "lora_c": ("lora_c", {}, None),
    "literal": ("pte", {"state_update": "literal"}, None),
    "unit": ("pte", {"state_update": "unit"}, None),
    "scaled": ("pte", {"state_update": "scaled"}, None),
    "gated": ("pte", {"state_update": "gated"}, None),
    "unit_gated": ("pte", {"state_update": "unit_gated"}, None),
    "unit_gated_unrot": ("pte", {"state_update": "unit_gated", "fold_keys": "unrotated"}, None),
    "softmax": ("pte", {"state_update": "literal", "state_softmax": True}, None),
    "literal_unrot": ("pte", {"state_update": "literal", "fold_keys": "unrotated"}, None),
    "unit_unrot": ("pte", {"state_update": "unit", "fold_keys": "unrotated"}, None),
    "scaled_unrot": ("pte", {"state_update": "scaled", "fold_keys": "unrotated"}, None),
    "gated_unrot": ("pte", {"state_update": "gated", "fold_keys": "unrotated"}, None),
    "reset": ("pte", {"state_update": "literal"}, "reset"),
    "kv_S0": ("pte", {"state_update": "literal"}, "kv_S0"),
    "cut": ("pte", {"state_update": "literal"}, "cut"),
    "literal_x300": ("pte", {"state_update": "literal"}, "amp"),
    "unit_cut": ("pte", {"state_update": "unit"}, "cut"),
    "scaled_cut": ("pte", {"state_update": "scaled"}, "cut"),
}


def n_fill_for(k_events):
    # events come before thought t = W, W+E, ... < T-1 = n_fill + 2; the first evicts the secret
    E = math.ceil(W / 4)
    return W + E * k_events


def toy_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="qwen2", vocab_size=32, hidden_size=64, intermediate_size=128, n_layers=2,
                      n_heads=4, n_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                      rope_scaling=None, attention_bias=True, tie_word_embeddings=False)
    return Transformer(cfg)


def batch(n, n_fill, g):
    secret = torch.randint(0, 10, (n, 1), generator=g)
    fill = torch.randint(10, 30, (n, n_fill), generator=g)
    return torch.cat([secret, fill, torch.full((n, 1), QUERY), secret], 1)


def train_base(model, n_fill, g, steps=200):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        y = batch(64, n_fill, g)
        x = torch.cat([torch.full((64, 1), BOS), y], 1)
        loss = F.cross_entropy(model(x[:, :-1])[:, -1], y[:, -1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.requires_grad_(False)
    with torch.no_grad():
        y = batch(256, n_fill, torch.Generator().manual_seed(9))
        x = torch.cat([torch.full((256, 1), BOS), y], 1)
        return float((model(x[:, :-1])[:, -1].argmax(-1) == y[:, -1]).float().mean())


class _S0View:
    """Stands in for a LayerAdapter in a LoRALinear: reads S0 (the global-token state) instead of S."""
    def __init__(self, la, use_S=lambda: False):
        self.la, self.use_S = la, use_S

    @property
    def enabled(self):
        return self.la.enabled

    @property
    def S_active(self):
        S = self.la.S_active
        if S is None or self.use_S():
            return S
        return self.la.initial_state(S.shape[0])


def apply_probe(ad, model, probe, n_events):
    if probe == "reset":
        for la in ad.layers:
            la.update = (lambda la: lambda S, K, V:
                         type(la).update(la, la.initial_state(S.shape[0]), K, V))(la)
    elif probe == "amp":  # the real-Qwen regime: S' rows 77-676 (toy: ~0.2), S' x 300 dominates S each event
        for la in ad.layers:
            la.update = (lambda la: lambda S, K, V: la.normalize(S + 300 * la.encode(K, V)))(la)
    elif probe == "kv_S0":
        for block, la in zip(model.model.layers, ad.layers):
            for n in ("k_proj", "v_proj"):
                lin = getattr(block.self_attn, n)
                lin._refs = (lin._refs[0], _S0View(la))
    elif probe == "cut":
        count = {"n": 0}
        reset, fold = ad.reset, ad.fold

        def reset_(B):
            count["n"] = 0
            reset(B)

        def fold_(*a):
            count["n"] += 1
            fold(*a)
        ad.reset, ad.fold = reset_, fold_
        last = lambda: count["n"] == n_events
        for block, la in zip(model.model.layers, ad.layers):
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                lin = getattr(block.self_attn, n)
                lin._refs = (lin._refs[0], _S0View(la, last))


def answer_loss_for(n_fill):
    def f(lp, t0, t1):
        return -lp[:, -1].mean() if t1 == n_fill + 3 else lp.sum() * 0
    return f


def accuracy(model, ad, n_fill, g, n=128):
    y = batch(n, n_fill, g)
    lp = torch.stack([replay(model, ad, [[BOS]] * n, torch.cat([y[:, :-1], torch.full((n, 1), d)], 1),
                             window=W)[:, -1] for d in range(10)], 1)
    return float((lp.argmax(1) == y[:, -1]).float().mean())


@torch.no_grad()
def diagnostics(model, ad, n_fill, n=64):
    """Under the trained adapters: per event, mean row norm of S' (Eq. 4 as the update adds it, i.e. after the
    unit/scaled/gated weight), cos(S_after, S_before) (how much of the old state survives one event), and
    cos(S at the query, S right after the secret's event)."""
    if not ad.is_pte:
        return {}
    rec = {"sp_norm": [], "survive": []}
    S_secret = {}
    orig = [la.update for la in ad.layers]

    def wrap(i, la, upd):
        def f(S, K, V):
            new = upd(S, K, V)
            rec["survive"].append(float(F.cosine_similarity(new.flatten(1), S.flatten(1), dim=-1).mean()))
            Sp = new * 0  # the weighted S' = Normalize^-1 is not recoverable; recompute it
            Sp = la.encode(K, V)
            mode, m = la.cfg.state_update, K.shape[1]
            if mode == "unit":
                Sp = la.normalize(Sp)
            elif mode == "unit_gated":
                Sp = la.normalize(Sp) * la.cfg.gate_init * la.log_gate.exp()
            elif mode in ("scaled", "gated"):
                Sp = Sp / (m * math.sqrt(la.d_kv)) * (la.log_gate.exp() if mode == "gated" else 1)
            rec["sp_norm"].append(float(Sp.norm(dim=-1).mean()))
            S_secret.setdefault(i, new)
            S_secret[("last", i)] = new
            return new
        return f
    for i, la in enumerate(ad.layers):
        la.update = wrap(i, la, orig[i])
    y = batch(n, n_fill, torch.Generator().manual_seed(4))
    replay(model, ad, [[BOS]] * n, y, window=W)
    for i, la in enumerate(ad.layers):
        la.update = orig[i]
    keep = [float(F.cosine_similarity(S_secret[("last", i)].flatten(1), S_secret[i].flatten(1),
                                      dim=-1).mean())
            for i in range(len(ad.layers))]
    mean = lambda v: sum(v) / max(len(v), 1)
    return {"sp_row_norm": mean(rec["sp_norm"]), "cos_S_after_S_before": mean(rec["survive"]),
            "cos_S_query_S_secret": mean(keep)}


def run(variant, k_events, lr, steps, bsz, base_sd):
    method, over, probe = VARIANTS[variant]
    n_fill = n_fill_for(k_events)
    n_events = k_events + 1  # the secret's own event + k after it
    model = toy_model()
    model.load_state_dict(base_sd)
    model.requires_grad_(False)
    torch.manual_seed(1)
    ad = Adapters(model, AdapterConfig(method=method, rank=8, n_global=8, **over))
    apply_probe(ad, model, probe, n_events)
    opt = torch.optim.Adam(ad.parameters(), lr=lr)
    gm = torch.Generator().manual_seed(2)
    loss_fn = answer_loss_for(n_fill)
    t = time.time()
    for _ in range(steps):
        y = batch(bsz, n_fill, gm)
        opt.zero_grad()
        replay(model, ad, [[BOS]] * bsz, y, window=W, loss_fn=loss_fn)
        opt.step()
    acc = accuracy(model, ad, n_fill, torch.Generator().manual_seed(3))
    out = {"variant": variant, "events": k_events, "window": W, "lr": lr, "steps": steps, "batch": bsz,
           "acc": acc, "seconds": round(time.time() - t, 1), **diagnostics(model, ad, n_fill)}
    if method == "pte" and over.get("state_update") in ("gated", "unit_gated"):
        out["gate"] = [float(la.log_gate.detach().exp()) for la in ad.layers]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, nargs="+", default=[1, 3, 10, 30])
    ap.add_argument("--variants", nargs="+",
                    default=["literal", "unit", "scaled", "gated", "softmax", "lora_c"])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "recall.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--window", type=int, default=8, help="W; E = ceil(W/4) = m tokens folded per event")
    args = ap.parse_args()
    global W
    W = args.window
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"runs": [], "base_acc": {}}
    done = {(r["variant"], r["events"], r["lr"], r["steps"], r["batch"], r.get("window", 8))
            for r in results["runs"]}
    for k in args.events:
        base = toy_model()
        key = f"{k}" if W == 8 else f"{k}@W{W}"
        results["base_acc"][key] = train_base(base, n_fill_for(k), torch.Generator().manual_seed(0))
        sd = base.state_dict()
        for lr in args.lrs:
            for v in args.variants:
                if (v, k, lr, args.steps, args.batch, W) in done:
                    continue
                r = run(v, k, lr, args.steps, args.batch, sd)
                print(json.dumps(r), flush=True)
                results["runs"].append(r)
                out.write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results):
    runs = results["runs"]
    for w, lr in sorted({(r.get("window", 8), r["lr"]) for r in runs}):
        sel = [r for r in runs if r.get("window", 8) == w and r["lr"] == lr]
        cols = sorted({r["events"] for r in sel})
        print(f"\nW {w} (m = {math.ceil(w / 4)}), lr {lr:g}: accuracy vs events after the secret's eviction "
              f"(chance 0.10)")
        print(f"{'variant':16s}" + "".join(f"{k:>8d}" for k in cols))
        for v in VARIANTS:
            row = {r["events"]: r["acc"] for r in sel if r["variant"] == v}
            if row:
                print(f"{v:16s}" + "".join(f"{row[k]:8.2f}" if k in row else f"{'':>8s}" for k in cols))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        table = Path(sys.argv[2] if len(sys.argv) > 2 else ROOT / "experiments/recall.json")
        print_table(json.loads(table.read_text()))
    else:
        main()
