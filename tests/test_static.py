"""The static decode step (model.decode_one_token; a CUDA graph on GPUs) gives the same tokens and log-probs
as the dynamic step, in fp64 on CPU (eagerly: generate(static=True)): window and full mode (several attention
buckets), ragged prompts, several eviction events, greedy and seeded sampling, with and without PTE adapters,
Qwen2 and Llama. Also: the every-k stop check, on_token, the adapters' fixed S buffers, and (CUDA only) the
graph against the same step run eagerly."""
import pytest
import torch

import model as M
from model import generate, load_model
from pte import AdapterConfig, Adapters

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-9  # fp64: only the order of a few reductions differs between the two paths
PLENS = (5, 11, 2)  # left-padded to P = 11


def prompts_for(seed=0, lens=PLENS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 250, (n,), generator=g).tolist() for n in lens]


def fp64_model(d, adapter):
    model, tok = load_model(str(d), dtype=torch.float64, device="cpu")
    ad = None
    if adapter:
        ad = Adapters(model, AdapterConfig(method="pte", rank=4, n_global=3))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # random, non-zero adapters: S matters, and every fold changes the logits
            for p in ad.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model, tok, ad


def both(model, prompts, n, temperature, window, ad, stop_ids=(), **kw):
    """(dynamic, static) generations from identically seeded generators."""
    return [generate(model, prompts, n, list(stop_ids), temperature, 1.0, window, adapter=ad,
                     generator=torch.Generator().manual_seed(7), pad_id=0, static=s, **kw)
            for s in (False, True)]


def assert_same(a, b):
    assert torch.equal(a.tokens, b.tokens)
    assert a.logprobs.dtype == b.logprobs.dtype == torch.float64
    assert (a.logprobs - b.logprobs).abs().max() < TOL
    for f in ("lengths", "truncated", "evictions"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.kv_bytes == b.kv_bytes


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("window", [4, 5, None])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("adapter", [False, True])
def test_static_equals_dynamic(qwen_dir, llama_dir, monkeypatch, kind, window, temperature, adapter):
    monkeypatch.setattr(M, "FULL_BUCKET", 8)  # full mode: the prompt (11) + 40 tokens cross 5 buckets
    model, _, ad = fp64_model(qwen_dir if kind == "qwen2" else llama_dir, adapter)
    prompts = prompts_for(1)
    dyn, sta = both(model, prompts, 40, temperature, window, ad)
    assert_same(dyn, sta)
    if window:
        assert int(sta.evictions.min()) >= 6  # several eviction (and fold) events
    if adapter:  # non-vacuous: the adapters change the log-probs of these tokens
        ad.set_enabled(False)
        base = generate(model, prompts, 40, [], temperature, 1.0, window,
                        generator=torch.Generator().manual_seed(7), static=True)
        assert not torch.equal(base.logprobs, sta.logprobs)


def test_full_mode_default_bucket(qwen_dir):
    model, _, ad = fp64_model(qwen_dir, True)
    assert_same(*both(model, prompts_for(2), 30, 1.0, None, ad))


def test_sampling_is_not_greedy(qwen_dir):
    """The temperature-1 cases above compare sampled sequences, not the greedy ones twice."""
    model, _, _ = fp64_model(qwen_dir, False)
    greedy = generate(model, prompts_for(1), 40, [], 0.0, static=True)
    sampled = generate(model, prompts_for(1), 40, [], 1.0, generator=torch.Generator().manual_seed(7),
                       static=True)
    assert not torch.equal(greedy.tokens, sampled.tokens)


@pytest.mark.parametrize("every", [1, 3, 16])
@pytest.mark.parametrize("window", [4, None])
def test_stop_every_k_same_outputs(qwen_dir, monkeypatch, every, window):
    """Stop ids that fire early (every sequence stops long before max_new_tokens): checking "all stopped" only
    every k steps runs extra steps whose tokens are forced to pad, and changes no output."""
    monkeypatch.setattr(M, "STOP_EVERY", every)
    model, _, ad = fp64_model(qwen_dir, True)
    prompts = prompts_for(3)
    free = generate(model, prompts, 40, [], 0.0, window=window, adapter=ad)
    stop = {row[3] for row in free.tokens.tolist()}  # each row's 4th token: every row stops by step 4
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    dyn = generate(model, prompts, 40, sorted(stop), 0.0, window=window, adapter=ad, static=False)
    n_dyn = len(calls)
    sta = generate(model, prompts, 40, sorted(stop), 0.0, window=window, adapter=ad, static=True)
    hook.remove()
    assert_same(dyn, sta)
    assert (not dyn.truncated.any() and int(dyn.lengths.max()) <= 4
            and int(dyn.lengths.min()) < int(dyn.lengths.max()))
    assert (dyn.tokens[:, 4:] == 0).all()
    if every == 16:  # non-vacuous: the static loop ran on past the last stop before it noticed
        assert len(calls) - n_dyn > n_dyn


def test_on_token_streams_the_same_tokens(qwen_dir):
    model, _, ad = fp64_model(qwen_dir, True)
    prompts = prompts_for(4)
    free = generate(model, prompts, 20, [], 0.0, window=4, adapter=ad)
    stop = sorted({row[6] for row in free.tokens.tolist()})  # every row stops by token 6
    got = {}
    for s in (False, True):
        seen = []
        generate(model, prompts, 20, stop, 0.0, window=4, adapter=ad, static=s,
                 on_token=lambda t: seen.append(t.tolist()))
        got[s] = seen
    assert got[False] == got[True] and len(got[True]) <= 7


@torch.no_grad()
def test_adapters_fold_in_place_under_no_grad(qwen_dir):
    """Generation keeps S in fixed per-layer buffers that LoRALinear reads: reset and fold copy into them."""
    model, _, ad = fp64_model(qwen_dir, True)
    ad.reset(3)
    bufs = list(ad.S)
    assert all(la.S_active is b for la, b in zip(ad.layers, bufs))
    before = [b.clone() for b in bufs]
    K = torch.randn(2, 3, 2, 2, 16, dtype=torch.float64)
    ad.fold(K, K.clone())
    assert all(S is b for S, b in zip(ad.S, bufs)) and all(la.S_active is b for la, b in zip(ad.layers, bufs))
    assert all(not torch.equal(a, b) for a, b in zip(before, bufs))
    ad.reset(3)
    assert all(S is b for S, b in zip(ad.S, bufs)) and all(torch.equal(a, b) for a, b in zip(before, bufs))
    with torch.enable_grad():  # replay's autograd path: a fresh differentiable chain, not the buffers
        ad.reset(3)
        assert all(S.requires_grad and S is not b for S, b in zip(ad.S, bufs))


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.0),
                                dict(top_p=2.0)])
def test_bad_sampling_arguments_raise(qwen_dir, kw):
    model, _, _ = fp64_model(qwen_dir, False)
    with pytest.raises(ValueError):
        generate(model, prompts_for(), 4, [], **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("window", [4, None])
def test_cuda_graph_equals_eager_static(qwen_dir, monkeypatch, window):
    """On a GPU: the captured step replays exactly what the eager static step computes, including the sampling
    noise drawn from the caller's generator, and leaves that generator in the same state."""
    monkeypatch.setattr(M, "FULL_BUCKET", 8)
    model, _ = load_model(str(qwen_dir), dtype=torch.float32, device="cuda")
    ad = Adapters(model, AdapterConfig(method="pte", rank=4, n_global=3))
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device="cuda") * 0.3)
    outs, states = [], []
    for graph in (False, True):
        gen = torch.Generator(device="cuda").manual_seed(7)
        outs.append(generate(model, prompts_for(1), 40, [], 1.0, 1.0, window, adapter=ad, generator=gen,
                             cuda_graph=graph))
        states.append(gen.get_state())
    a, b = outs
    assert torch.equal(a.tokens, b.tokens) and (a.logprobs - b.logprobs).abs().max() < 1e-5
    assert torch.equal(states[0], states[1])
