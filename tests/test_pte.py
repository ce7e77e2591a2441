"""PTE (pte.py): adapters at init equal the base, replay parity with the rollout, gradient parity with a plain
one-graph implementation, ablation flags, adapter round trip through disk."""
import pytest
import torch

from model import generate, load_model
from pte import AdapterConfig, AdapterError, Adapters, load_adapters, replay, save_adapters, token_logprobs

METHOD_WINDOW = {"lora": None, "lora_c": 6, "pte": 6}


def prompts_for(seed=0, lens=(5, 9, 7)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 250, (n,), generator=g).tolist() for n in lens]


def randomize(adapters, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("method", ["lora", "lora_c", "pte"])
@pytest.mark.parametrize("targets", ["qkvo", "all-linear"])
def test_fresh_adapters_generate_like_base(qwen_dir, method, targets):
    model, tok = load_model(str(qwen_dir))
    P, W = prompts_for(), METHOD_WINDOW[method]
    base = generate(model, P, 30, [], window=W, pad_id=tok.pad_id)
    ad = Adapters(model, AdapterConfig(method=method, rank=4, n_global=4, targets=targets))
    out = generate(model, P, 30, [], window=W, adapter=ad, pad_id=tok.pad_id)
    assert torch.equal(out.tokens, base.tokens)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("method", ["lora", "lora_c", "pte"])
@pytest.mark.parametrize("softmax", [False, True])
def test_replay_matches_rollout(qwen_dir, llama_dir, kind, method, softmax):
    """Replayed log-probs == sampled log-probs (<= 1e-4), several eviction events, ragged prompts, random adapters."""
    if softmax and method != "pte":
        pytest.skip("softmax only changes pte")
    model, tok = load_model(str(qwen_dir if kind == "qwen2" else llama_dir))
    ad = Adapters(model, AdapterConfig(method=method, rank=4, n_global=3, state_softmax=softmax))
    randomize(ad)
    W, P = METHOD_WINDOW[method], prompts_for(1)
    g = torch.Generator().manual_seed(0)
    out = generate(model, P, 40, [], temperature=1.0, window=W, adapter=ad, generator=g, pad_id=tok.pad_id)
    if W:
        assert int(out.evictions.min()) >= 5
    lp = replay(model, ad, P, out.tokens, window=W, temperature=1.0, pad_id=tok.pad_id)
    assert (lp - out.logprobs).abs().max() < 1e-4
    # the adapters matter: the base model's log-probs are far from these
    ad.set_enabled(False)
    base_lp = replay(model, ad, P, out.tokens, window=W, temperature=1.0, pad_id=tok.pad_id)
    assert (base_lp - out.logprobs).abs().max() > 1e-2


def plain_replay_loss(model, ad, prompts, tokens, window, weights):
    """The same computation in one autograd graph (memory-hungry): states by plain autograd, no leaves, one
    backward. Carried K/V are detached exactly as in replay (cache.update keeps detached copies)."""
    from cache import eviction_steps
    from model import left_pad
    idx, plens = left_pad(prompts, 0, "cpu")
    B, T = tokens.shape
    cache = model.new_cache(plens, T, window)
    plain_encode = lambda la, K, V: (la.q_g @ la.W_Q_a.T) @ (K @ la.W_K_a.T).transpose(1, 2) @ (V @ la.W_V_a.T)
    S = None
    if ad.is_pte:
        S = [la.normalize(plain_encode(la, la.k_g[None], la.v_g[None])).expand(B, -1, -1) if la.cfg.n_global
             else la.q_g.new_zeros(B, la.cfg.rank, la.cfg.rank) for la in ad.layers]
    ad.activate(S)
    bounds = [0] + eviction_steps(window, T - 1) + [T - 1]
    total = 0
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if s > 0:
            K_e, V_e, _ = cache.evict()
            if ad.is_pte:
                L, B_, H, E, D = K_e.shape
                K_e, V_e = (X.transpose(2, 3).reshape(L, B_, E, H * D) for X in (K_e, V_e))
                S = [la.normalize(S_l + plain_encode(la, K_e[i], V_e[i])) for i, (la, S_l) in enumerate(zip(ad.layers, S))]
                ad.activate(S)
        x = tokens[:, a:b] if s > 0 else torch.cat([idx, tokens[:, :b]], 1)
        h = model(x, cache, hidden_only=True)
        h = h[:, -(b - a + 1):] if s == 0 else h
        t0 = a if s == 0 else a + 1
        total = total + (token_logprobs(model, h, tokens[:, t0:b + 1]) * weights[:, t0:b + 1]).sum()
    total.backward()
    ad.activate(None)


@pytest.mark.parametrize("method", ["lora", "lora_c", "pte"])
def test_gradient_parity_with_plain_implementation(qwen_dir, method):
    model, tok = load_model(str(qwen_dir))
    ad = Adapters(model, AdapterConfig(method=method, rank=4, n_global=3))
    randomize(ad, seed=2, std=0.2)
    W, P = METHOD_WINDOW[method], prompts_for(3)
    out = generate(model, P, 30, [], temperature=1.0, window=W, adapter=ad,
                   generator=torch.Generator().manual_seed(1), pad_id=tok.pad_id)
    weights = torch.rand(out.tokens.shape, generator=torch.Generator().manual_seed(5))
    ad.zero_grad(set_to_none=True)
    replay(model, ad, P, out.tokens, window=W, loss_fn=lambda lp, t0, t1: (lp * weights[:, t0:t1]).sum())
    seg = {n: p.grad.clone() for n, p in ad.named_parameters()}
    ad.zero_grad(set_to_none=True)
    plain_replay_loss(model, ad, P, out.tokens, W, weights)
    for n, p in ad.named_parameters():
        rel = (seg[n] - p.grad).norm() / p.grad.norm().clamp_min(1e-12)
        assert rel < 1e-5, (n, float(rel))
        if method == "pte":
            assert seg[n].abs().sum() > 0, f"{n} received no gradient"


def test_ablation_flags(qwen_dir):
    model, tok = load_model(str(qwen_dir))
    P = prompts_for(4)
    ad = Adapters(model, AdapterConfig(method="pte", rank=4, n_global=0))
    randomize(ad)
    ad.reset(3)
    assert all(float(S.abs().max()) == 0 for S in ad.S)  # #Global-0: S0 = 0, so Delta W = 0 before any eviction
    for la in ad.layers:
        la.enabled = True
    K = torch.randn(2, 3, 2, 2, 16)
    ad.fold(K, K.clone())
    assert all(float(S.detach().abs().max()) > 0 for S in ad.S)
    row_norms = torch.stack([S.norm(dim=-1) for S in ad.S])
    assert torch.allclose(row_norms, torch.ones_like(row_norms), atol=1e-5)  # Normalize: row-wise L2

    model, tok = load_model(str(qwen_dir))
    ad = Adapters(model, AdapterConfig(method="pte", rank=4, n_global=3, global_only=True))
    randomize(ad)
    ad.reset(3)
    S0 = [S.clone() for S in ad.S]
    ad.fold(K, K.clone())
    assert all(torch.equal(a, b) for a, b in zip(S0, ad.S))  # Global-Only: evictions never change S
    # and under generation with evictions, a global-only adapter behaves like a static adapter (same tokens
    # whether or not evictions would have been folded: compare to pte with the same weights but folding on)
    out_go = generate(model, P, 30, [], window=6, adapter=ad, pad_id=tok.pad_id)
    ad.cfg.global_only = False
    out_pte = generate(model, P, 30, [], window=6, adapter=ad, pad_id=tok.pad_id)
    assert not torch.equal(out_go.logprobs, out_pte.logprobs)


def test_adapter_round_trip_and_mismatch(tmp_path, qwen_dir, llama_dir):
    model, tok = load_model(str(qwen_dir))
    ad = Adapters(model, AdapterConfig(method="pte", rank=4, n_global=3))
    randomize(ad)
    P = prompts_for(5)
    before = generate(model, P, 25, [], window=6, adapter=ad, pad_id=tok.pad_id)
    save_adapters(ad, tmp_path / "a")
    model2, _ = load_model(str(qwen_dir))
    ad2 = load_adapters(model2, tmp_path / "a")
    after = generate(model2, P, 25, [], window=6, adapter=ad2, pad_id=tok.pad_id)
    assert torch.equal(before.tokens, after.tokens) and torch.equal(before.logprobs, after.logprobs)
    other, _ = load_model(str(llama_dir))
    with pytest.raises(AdapterError, match="trained for base model"):
        load_adapters(other, tmp_path / "a")
    with pytest.raises(AdapterError, match="unknown method"):
        AdapterConfig(method="dora")
