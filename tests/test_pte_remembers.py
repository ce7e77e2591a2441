"""The paper's claim in one test: PTE remembers what the window forgot.

Task: after a one-token prompt, the "thought" is a secret digit, then 20 random filler tokens, then a query
token; the answer is the secret. With W = 8 the secret is evicted long before the query. A tiny base model is
first trained with a full cache (so, like a real LRM, it can solve the task when it sees everything), then frozen;
each method trains its adapters with teacher forcing for the same budget through `pte.replay`:
lora (full cache) and pte (window + state S) reach >= 90%, lora_c (window, no state) stays near chance (10%)."""
import pytest
import torch

from model import ModelConfig, Transformer
from pte import AdapterConfig, Adapters, replay

BOS, QUERY, N_FILL, W = 30, 31, 20, 8


def toy_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="qwen2", vocab_size=32, hidden_size=64, intermediate_size=128, n_layers=2, n_heads=4,
                      n_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                      attention_bias=True, tie_word_embeddings=False)
    return Transformer(cfg)


def batch(n, g):
    secret = torch.randint(0, 10, (n, 1), generator=g)
    fill = torch.randint(10, 30, (n, N_FILL), generator=g)
    q = torch.full((n, 1), QUERY)
    return torch.cat([secret, fill, q, secret], 1)  # the completion (thought); the prompt is [BOS]


def train_base(model, g, steps=200):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        y = batch(64, g)
        x = torch.cat([torch.full((64, 1), BOS), y], 1)
        logits = model(x[:, :-1])[:, -1]  # full cache: predict the answer at the query position
        loss = torch.nn.functional.cross_entropy(logits, y[:, -1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.requires_grad_(False)


def answer_loss(lp, t0, t1):  # only the answer (the last completion token) is trained
    return -lp[:, -1].mean() if t1 == N_FILL + 3 else lp.sum() * 0


def accuracy(model, ad, window, g):
    """Greedy accuracy among the 10 digits: replay each candidate answer and take the most likely one."""
    y = batch(128, g)
    lp = torch.stack([replay(model, ad, [[BOS]] * 128, torch.cat([y[:, :-1], torch.full((128, 1), d)], 1),
                             window=window)[:, -1] for d in range(10)], 1)  # (128, 10)
    return float((lp.argmax(1) == y[:, -1]).float().mean())


@pytest.mark.usefixtures("one_thread")
def test_pte_remembers_evicted_thought(state_softmax=False):
    # the literal Eq. 4. With 150 steps the softmax variant (--state-softmax) is still at 15%: it learns slower
    run_remember(state_softmax)


def run_remember(state_softmax):
    g = torch.Generator().manual_seed(0)
    base = toy_model()
    train_base(base, g)
    results = {}
    for method, window in (("lora", None), ("lora_c", W), ("pte", W)):
        model = toy_model()
        model.load_state_dict(base.state_dict())
        model.requires_grad_(False)
        torch.manual_seed(1)
        ad = Adapters(model, AdapterConfig(method=method, rank=8, n_global=8, state_softmax=state_softmax))
        opt = torch.optim.Adam(ad.parameters(), lr=1e-3)
        gm = torch.Generator().manual_seed(2)
        for _ in range(150):
            y = batch(64, gm)
            opt.zero_grad()
            replay(model, ad, [[BOS]] * 64, y, window=window, loss_fn=answer_loss)
            opt.step()
        results[method] = accuracy(model, ad, window, torch.Generator().manual_seed(3))
    print(results)
    assert results["lora"] >= 0.9 and results["pte"] >= 0.9, results
    assert results["lora_c"] <= 0.3, results  # chance is 0.1
