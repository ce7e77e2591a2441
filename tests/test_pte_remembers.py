"""The paper's claim in one test: PTE remembers what the window forgot.

Task: after a one-token prompt, the "thought" is a secret digit, then 20 random filler tokens, then a query
token; the answer is the secret. With W = 8 the secret is evicted long before the query. A tiny base model is
first trained with a full cache (so, like a real LRM, it can solve the task when it sees everything), then
frozen; each method trains its adapters with teacher forcing for the same budget through `pte.replay`:
lora (full cache) and pte (window + state S) reach >= 90%, lora_c (window, no state) stays near
chance (10%)."""
import pytest
import torch

from model import ModelConfig, Transformer
from pte import AdapterConfig, Adapters, replay

BOS, QUERY, N_FILL, W = 30, 31, 20, 8


def toy_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="qwen2", vocab_size=32, hidden_size=64, intermediate_size=128, n_layers=2,
                      n_heads=4, n_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                      rope_scaling=None, attention_bias=True, tie_word_embeddings=False)
    return Transformer(cfg)


def batch(n, g, n_fill=N_FILL):
    secret = torch.randint(0, 10, (n, 1), generator=g)
    fill = torch.randint(10, 30, (n, n_fill), generator=g)
    q = torch.full((n, 1), QUERY)
    return torch.cat([secret, fill, q, secret], 1)  # the completion (thought); the prompt is [BOS]


def train_base(model, g, steps=200, n_fill=N_FILL):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        y = batch(64, g, n_fill)
        x = torch.cat([torch.full((64, 1), BOS), y], 1)
        logits = model(x[:, :-1])[:, -1]  # full cache: predict the answer at the query position
        loss = torch.nn.functional.cross_entropy(logits, y[:, -1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.requires_grad_(False)


def answer_loss_for(n_fill):  # only the answer (the last completion token) is trained
    return lambda lp, t0, t1: -lp[:, -1].mean() if t1 == n_fill + 3 else lp.sum() * 0


answer_loss = answer_loss_for(N_FILL)


def accuracy(model, ad, window, g, n_fill=N_FILL):
    """Greedy accuracy among the 10 digits: replay each candidate answer and take the most likely one."""
    y = batch(128, g, n_fill)
    lp = torch.stack([replay(model, ad, [[BOS]] * 128, torch.cat([y[:, :-1], torch.full((128, 1), d)], 1),
                             window=window)[:, -1] for d in range(10)], 1)  # (128, 10)
    return float((lp.argmax(1) == y[:, -1]).float().mean())


@pytest.mark.usefixtures("one_thread")
def test_pte_remembers_evicted_thought(state_softmax=False):
    # the default Eq. 6 (state_update="literal"). With 150 steps the softmax variant (--state-softmax) is
    # still at 15%: it learns slower
    results = run_remember(state_softmax)
    assert results["lora"] >= 0.9 and results["pte"] >= 0.9, results
    assert results["lora_c"] <= 0.3, results  # chance is 0.1


def train_adapters(base, method, window, n_fill, steps=150, bsz=64, lr=1e-3, **cfg):
    model = toy_model()
    model.load_state_dict(base.state_dict())
    model.requires_grad_(False)
    torch.manual_seed(1)
    ad = Adapters(model, AdapterConfig(method=method, rank=8, n_global=8, **cfg))
    opt = torch.optim.Adam(ad.parameters(), lr=lr)  # state_update="scaled" needs ~3e-3 here (0.78 at 1e-3)
    gm = torch.Generator().manual_seed(2)
    loss = answer_loss_for(n_fill)
    for _ in range(steps):
        y = batch(bsz, gm, n_fill)
        opt.zero_grad()
        replay(model, ad, [[BOS]] * bsz, y, window=window, loss_fn=loss)
        opt.step()
    return accuracy(model, ad, window, torch.Generator().manual_seed(3), n_fill)


def run_remember(state_softmax):
    g = torch.Generator().manual_seed(0)
    base = toy_model()
    train_base(base, g)
    results = {method: train_adapters(base, method, window, N_FILL, state_softmax=state_softmax)
               for method, window in (("lora", None), ("lora_c", W), ("pte", W))}
    print(results)
    return results


def test_state_survives_a_real_sized_event():
    """Why state_update="scaled" exists: real weights fold m = 192 keys/values per event and the literal S'
    (row norms 77-676 on Qwen) overwrites S. One event of that size, on the toy adapters: the literal form
    forgets the previous state; scaled keeps most of it, and so carries what S held across events."""
    g = torch.Generator().manual_seed(0)
    m, mean = 192, torch.randn(1, 1, 2, 1, 16, generator=g) * 2  # keys/values share a mean (biases, outliers)
    K = mean + torch.randn(2, 1, 2, m, 16, generator=g) * 2
    V = mean.flip(-1) + torch.randn(2, 1, 2, m, 16, generator=g) * 2
    cos = {}
    for update in ("literal", "scaled"):
        ad = Adapters(toy_model(), AdapterConfig(method="pte", rank=8, n_global=8, state_update=update))
        with torch.no_grad():
            ad.reset(1)
            before = [S.clone() for S in ad.S]
            ad.fold(K, V, torch.arange(m)[None])
            cos[update] = min(float(torch.cosine_similarity(a.flatten(), b.flatten(), 0))
                              for a, b in zip(before, ad.S))
            rows = max(float(la.encode(K.transpose(2, 3).reshape(2, 1, m, 32)[i],
                                       V.transpose(2, 3).reshape(2, 1, m, 32)[i])
                             .norm(dim=-1).max()) for i, la in enumerate(ad.layers))
    print(cos, rows)
    assert cos["scaled"] > 0.9 and cos["literal"] < 0.5, (cos, rows)
