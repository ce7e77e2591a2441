"""
demo.py: the paper in miniature, offline on a laptop CPU in a few minutes (`python demo.py`).

The task makes the answer depend on thought tokens written early in the completion. The prompt is K digits;
the model must state the running sums while working, think for NF steps (a fixed "w0 w1 ..." pattern), then
answer with the last running sum:

    prompt      <bos> 3 7 1 [instruction] =>
    completion  3 0 1  w0 w1 ... w7  ?  1  <eos>   (answer = (3+7+1) mod 10; reward 1 iff exactly this shape)

With a sliding window of W = 8 thought tokens, the running sums are evicted before the answer;
recomputing the sum of K digits from the (pinned) prompt in one step is what the tiny model cannot do. So:
  1. a tiny Qwen2-shaped model is taught the task with a full cache (like a real LRM, it solves it when it
     sees everything), saved as a Hugging Face folder, and loaded back through model.load_model;
  2. it is evaluated with the full cache and under the window: the window gap appears
     (the paper's motivation);
  3. grpo.train, the real GRPO loop, trains lora (full cache), lora_c and pte (window W) with equal budgets;
  4. a Table-1-shaped table (method, peak memory of one replay step, KV-cache bytes, accuracy) is printed and
     written to demo.json, with demo.png (accuracy and memory bars, reward curves).
Only the model size, the task and the budgets differ from a real run; every function is the real one.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import grpo
from bench import peak_tensor_memory  # exact CPU tensor accounting (torch.profiler)
from checkpoint import load_adapters
from model import ModelConfig, Transformer, generate, load_model
from pte import replay
from tokenizer import Tokenizer

DIGITS = [str(i) for i in range(10)]
FILL_WORDS = [f"w{i}" for i in range(20)]
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %} =>{% endif %}")


# -----------------------------------------------------------------------------------------------------------
# the task

def make_problems(n, K, seed):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randint(0, 10, (n, K), generator=g).tolist()
    return [{"id": f"demo-{seed}-{i}", "problem": " ".join(map(str, x)), "answer": str(sum(x) % 10)}
            for i, x in enumerate(xs)]


def completion_words(problem, NF):
    x = [int(t) for t in problem.split()]
    sums = [sum(x[:i + 1]) % 10 for i in range(len(x))]
    return [str(s) for s in sums] + [FILL_WORDS[i % 20] for i in range(NF)] + ["?", str(sums[-1])]


def make_reward(K, NF):
    fill = [FILL_WORDS[i % 20] for i in range(NF)]

    def reward(text, gold, truncated=False):
        """1.0 iff: K digits, the exact filler pattern (no side channel for the answer),
        '?', the right answer."""
        w = text.split()
        ok = (not truncated and len(w) == K + NF + 2 and all(t in DIGITS for t in w[:K])
              and w[K:K + NF] == fill and w[-2] == "?" and w[-1] == gold)
        return float(ok)
    return reward


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<unk>", "<pad>", "<bos>", "<eos>", "=>", "?"] + DIGITS + FILL_WORDS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<pad>", "<bos>", "<eos>"])
    tok.add_tokens([INSTRUCTION])  # the boxed-style instruction is one token: short prompts, small caches
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE, "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}))
    return tok.get_vocab_size()


def build_base(folder: Path, K, NF, steps, seed, log):
    """A tiny Qwen2-shaped model taught the task with a full cache (teacher forcing),
    saved as an HF folder."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    V = build_tokenizer(folder)
    hf = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": V, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
          "rope_theta": 10000.0, "tie_word_embeddings": False, "eos_token_id": 3}
    (folder / "config.json").write_text(json.dumps(hf, indent=1))
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(hf))
    tok = Tokenizer(folder)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        probs = make_problems(64, K, seed * 1000 + step)
        P = [data.encode_prompt(tok, p["problem"], "boxed") for p in probs]
        Y = [tok.encode(" ".join(completion_words(p["problem"], NF))) + [3] for p in probs]  # + <eos>
        x = torch.tensor([p + y for p, y in zip(P, Y)])  # every prompt has the same length here
        logits = model(x[:, :-1])[:, len(P[0]) - 1:]
        y = x[:, len(P[0]):]
        lt = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="none").view(y.shape)
        # the answer is taught with label smoothing: like a real LRM, the model is then unsure rather than
        # confidently wrong when its context is degraded, so GRPO sees some successes to learn from
        loss = (torch.cat([lt[:, :-2], lt[:, -1:]], 1).mean()
                + F.cross_entropy(logits[:, -2], y[:, -2], label_smoothing=0.3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"  base step {step + 1}/{steps}: loss {loss.item():.4f}")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


# -----------------------------------------------------------------------------------------------------------
# measurement

def accuracy(model, tok, adapters, problems, window, K, NF):
    """Greedy accuracy under the given cache (window None = full), and the KV-cache bytes it held."""
    reward = make_reward(K, NF)
    P = [data.encode_prompt(tok, p["problem"], "boxed") for p in problems]
    out = generate(model, P, K + NF + 3, tok.stop_ids, 0.0, 1.0, window, adapter=adapters, pad_id=tok.pad_id)
    texts = [tok.decode(out.tokens[i, :int(out.lengths[i])].tolist()) for i in range(len(P))]
    acc = sum(reward(t, p["answer"], bool(tr)) for t, p, tr in zip(texts, problems, out.truncated)) / len(P)
    return acc, out.kv_bytes


def replay_step_memory(model, tok, adapters, problems, window, K, NF):
    """Peak tensor memory of one replay + backward (the training step's cost)
    on 16 teacher-forced completions."""
    P = [data.encode_prompt(tok, p["problem"], "boxed") for p in problems]
    Y = torch.tensor([tok.encode(" ".join(completion_words(p["problem"], NF))) + [3] for p in problems])
    _, peak = peak_tensor_memory(lambda: replay(model, adapters, P, Y, window, 1.0,
                                                loss_fn=lambda lp, t0, t1: -lp.mean(), pad_id=tok.pad_id))
    adapters.zero_grad(set_to_none=True)
    return peak


# -----------------------------------------------------------------------------------------------------------
# main

def main(argv=None):
    ap = argparse.ArgumentParser(description="The paper in miniature: "
                                 "base, lora, lora_c and pte on a toy task.")
    ap.add_argument("--out", default="runs/demo", help="output folder (demo.json, demo.png, runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--digits", type=int, default=3, help="K: prompt digits whose running sums are written")
    # 8: pte took off on every seed and CPU tried (seeds 0 / 1: 1.00 / 0.91); at 16 the sums are evicted 5
    # events before the answer and pte's GRPO run took off on some seeds only (0.10 / 0.38 / 0.84, seeds 0-2)
    ap.add_argument("--filler", type=int, default=8, help="NF: thinking steps "
                    "between the sums and the answer")
    ap.add_argument("--window", type=int, default=8, help="W: thought window of lora_c and pte")
    ap.add_argument("--base-steps", type=int, default=600, help="teacher-forcing steps for the base model")
    ap.add_argument("--steps", type=int, default=200, help="GRPO steps per method (equal budgets)")
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3, help="toy-scale lr (a real run uses 1e-5)")
    ap.add_argument("--eval-problems", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a tiny model: 1 is fastest)")
    ap.add_argument("--methods", default="lora,lora_c,pte", help="which adapters to train (comma list)")
    ap.add_argument("--state-update", default=grpo.GRPOConfig.state_update, choices=grpo.STATE_UPDATES,
                    help="pte's Eq. 6 form (README choice 8; literal = the paper as written)")
    ap.add_argument("--verbose", action="store_true", help="show grpo.py's per-step lines")
    ap.add_argument("--quiet", action="store_true", help="print only the final table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, K, NF, W = Path(args.out), args.digits, args.filler, args.window
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    t_start = time.time()

    log(f"1. teaching a tiny base model the task with a full cache ({args.base_steps} steps)")
    base_dir = out / "base"
    build_base(base_dir, K, NF, args.base_steps, args.seed, log)
    test = make_problems(args.eval_problems, K, 10_000 + args.seed)
    model, tok = load_model(str(base_dir), device="cpu")
    rows = []
    for name, window in (("base (full cache)", None), (f"base (window {W})", W)):
        acc, kv = accuracy(model, tok, None, test, window, K, NF)
        rows.append({"method": name, "window": window, "accuracy": acc, "kv_cache_bytes": kv,
                     "peak_memory_bytes": None})
        log(f"2. {name}: accuracy {acc:.3f}")

    train = out / "train.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in make_problems(4000, K, 1 + args.seed)))
    curves = {}
    for method in args.methods.split(","):
        log(f"3. GRPO, {method}, window {'full' if method == 'lora' else W}, {args.steps} steps")
        run = out / method
        if run.exists():
            import shutil
            shutil.rmtree(run)
        cfg = grpo.GRPOConfig(model=str(base_dir), train_data=str(train), prompt_style="boxed", method=method,
                              window=W, max_new_tokens=K + NF + 3, group_size=args.group_size,
                              prompts_per_step=args.prompts_per_step,
                              micro_batch=args.prompts_per_step * args.group_size,
                              steps=args.steps, lr=args.lr, rank=8, global_tokens=8, seed=args.seed,
                              out=str(run), save_every=args.steps, keep=1, log_samples=0, device="cpu",
                              state_update=args.state_update)
        grpo.train(cfg, reward_fn=make_reward(K, NF), quiet=not args.verbose)
        curves[method] = [json.loads(l)["reward"] for l in (run / "log.jsonl").read_text().splitlines()]
        model, tok = load_model(str(base_dir), device="cpu")
        adapters = load_adapters(model, run / f"ckpt-{args.steps:06d}")
        window = None if method == "lora" else W
        acc, kv = accuracy(model, tok, adapters, test, window, K, NF)
        mem = replay_step_memory(model, tok, adapters, test[:16], window, K, NF)
        rows.append({"method": method, "window": window, "accuracy": acc, "kv_cache_bytes": kv,
                     "peak_memory_bytes": mem})
        log(f"   {method}: mean reward of the last 20 steps {sum(curves[method][-20:]) / 20:.3f}, "
            f"greedy accuracy {acc:.3f}")

    acc = {r["method"]: r["accuracy"] for r in rows}
    # the share of the lora_c -> lora gap that pte closes; None unless all three ran and the gap exists
    recovered = None
    if {"lora", "lora_c", "pte"} <= acc.keys() and acc["lora"] > acc["lora_c"]:
        recovered = (acc["pte"] - acc["lora_c"]) / (acc["lora"] - acc["lora_c"])
    print(f"\nThe paper in miniature: K={K} digits, {NF} thinking steps, window W={W} "
          f"(evict {-(-W // 4)} per event), {args.steps} GRPO steps per method\n")
    print(f"{'method':<22}{'peak mem (replay)':>19}{'KV cache':>11}{'accuracy':>10}")
    for r in rows:
        mem = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.2f} MiB"
        print(f"{r['method']:<22}{mem:>19}{r['kv_cache_bytes'] / 1024:>8.1f} KiB{r['accuracy']:>10.3f}")
    took = f"({time.time() - t_start:.0f} s)"
    print(f"\npte recovers {recovered:.0%} of the gap between lora_c and full-cache lora {took}"
          if recovered is not None else f"\n{took}")
    result = {"rows": rows, "reward_curves": curves, "recovered_gap": recovered,
              "seconds": time.time() - t_start, "settings": vars(args)}
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    plot(rows, curves, out / "demo.png")
    print(f"wrote {out / 'demo.json'} and {out / 'demo.png'}")
    return result


def plot(rows, curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    names = [r["method"] for r in rows]
    ax[0].bar(names, [r["accuracy"] for r in rows],
              color=["#999", "#bbb", "#4c72b0", "#dd8452", "#55a868"][:len(rows)])
    ax[0].set_title("greedy accuracy")
    ax[0].tick_params(axis="x", rotation=30)
    trained = [r for r in rows if r["peak_memory_bytes"] is not None]
    ax[1].bar([r["method"] for r in trained], [r["peak_memory_bytes"] / 2**20 for r in trained],
              color=["#4c72b0", "#dd8452", "#55a868"][:len(trained)])
    ax[1].set_title("peak tensor memory of one replay step (MiB)")
    for m, c in curves.items():
        ax[2].plot(range(1, len(c) + 1), c, label=m)
    ax[2].set_title("GRPO mean reward per step")
    ax[2].set_xlabel("step")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
