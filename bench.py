"""
bench.py: CPU benchmarks of model.py / cache.py. A benchmark script, not a test: it prints tables and ratios
against a baseline measured in the same process, and writes JSON with --out.

    python bench.py decode                   # ours vs transformers generate, Qwen2.5-0.5B shape, fp32, 2 threads,
                                             #   batch 1, 8, 32, 128 new tokens, greedy, 32-token prompts (minutes)
    python bench.py decode --batches 8 --new-tokens 64 --repeats 2 --wait-quiet 120 --out decode.json
    python bench.py window                   # ms/token at 1K, 2K, 4K, 8K generated tokens, full vs window (W=512)
    python bench.py window --lengths 1024,4096 --window 256 --batch 4 --out window.json
    python bench.py decode --quick           # smoke runs: tiny shapes, a few tokens (< 30 s each)
    python bench.py window --quick

decode  Both sides run the SAME random weights: a transformers Qwen2ForCausalLM(Qwen2Config(shape)) is saved
        with a tiny byte-level tokenizer to a temporary folder, and ours is loaded from that folder with
        model.load_model. Throughput = batch * new_tokens / wall time of one whole generate call, i.e. the
        32-token prefill is included on both sides. The "step" columns are batch / median time of one decode
        step (a forward hook stamps every forward call: prefill excluded, robust to bursts of load). Warm-up:
        one short generate per side and batch size before timing. With --repeats R the sides run in ABBA
        order and the fastest run of each is kept, so slow drift of the box's load hits both sides alike.
window  Per-token decode time versus generation length, cache mode "full" and "window" (model.generate's
        loop, re-written here with a timer around each step: needs_evict() -> evict() -> model(tok, cache)).
        One run of max(lengths) tokens per mode, the two modes interleaved step by step (so load from other
        processes hits both alike); the reported ms/token at length L is the mean over the
        --slice steps ending at L (a multiple of the eviction period ceil(W/4), so it holds the same number
        of eviction events at every L). Also reports the KV-cache bytes of each mode (KVCache.nbytes()).
replay  Peak memory (CUDA: max_memory_allocated; CPU: torch.profiler allocation events, exact) and time of one
        pte.replay + backward step per method and completion length, on random weights built in-process:
            python bench.py replay                                  # hidden 512, 8 layers, W=512, 2K..16K tokens
            python bench.py replay --device cuda --dtype bfloat16 --shape qwen2.5-3b --lengths 1024,3072 \
                --window 1024 --batch 4 --rollout-tokens 1024        # the paper's memory claim at 3B scale
        Also the KV-cache bytes of a --gen-tokens generation (constant in window mode).

Timings on a shared 2-core box are noisy: one busy neighbour slows 2-thread runs several-fold. The load average
before and after each run is printed and saved; --wait-quiet S waits (up to S s) for an idle box before each
timed run, and the per-step medians of `decode` are robust to short bursts.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import model as ours  # noqa: E402  (model.py of this repo)

# -----------------------------------------------------------------------------------------------------------
# shared helpers (also meant for the `replay` subcommand)

# transformers Qwen2Config keyword arguments. Qwen2 always has q/k/v biases.
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                         rms_norm_eps=1e-6, max_position_embeddings=32768),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=1024, vocab_size=1024, tie_word_embeddings=True, rope_theta=1e6,
                  rms_norm_eps=1e-6, max_position_embeddings=32768),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True, rope_theta=1e6,
                 rms_norm_eps=1e-6, max_position_embeddings=32768),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 256, 257, 258 after the 256 byte tokens


def write_tokenizer(folder) -> dict:
    """A byte-level BPE with no merges (256 byte tokens + chat specials), as tests/conftest.py makes.
    Writes tokenizer.json + tokenizer_config.json; returns {special: id}."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(Path(folder) / "tokenizer.json"))
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}))
    return {s: tok.token_to_id(s) for s in SPECIALS}


def make_random_model(folder, shape="small", seed=0, **overrides):
    """Save a random transformers Qwen2ForCausalLM of the named shape (SHAPES) + tokenizer to `folder`
    (fp32). Returns the transformers model (eval mode); load ours from the same folder with
    model.load_model(folder) to get identical weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(folder)
    cfg = Qwen2Config(**{**SHAPES[shape], **overrides}, bos_token_id=ids["<|endoftext|>"],
                      eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM(cfg).to(torch.float32).eval().requires_grad_(False)
    hf.save_pretrained(folder)
    return hf


def random_prompts(batch, length, vocab, seed=0):
    """`batch` prompts of `length` byte-token ids (< 256, so no special ids), as lists."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(256, vocab), (batch, length), generator=g).tolist()


def wall(fn):
    """-> (fn(), seconds). CPU ops are synchronous; on CUDA the device is synchronised around the call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_peak_memory(fn, device="cpu", interval_s=0.001):
    """-> (fn(), peak bytes above the level just before the call).
    CUDA: torch.cuda.max_memory_allocated (allocator-exact). CPU: the process's resident set size, sampled every
    interval_s by a background thread (coarse: misses spikes shorter than the interval, and memory freed
    earlier but kept by malloc can be reused without showing up)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    base = peak = rss_bytes()
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(interval_s)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out = fn()
    finally:
        stop.set()
        th.join()
    return out, max(peak, rss_bytes()) - base


def other_runnable() -> int:
    """Runnable threads on the box right now, less this one (reads /proc/stat's procs_running)."""
    for ln in Path("/proc/stat").read_text().splitlines():
        if ln.startswith("procs_running"):
            return int(ln.split()[1]) - 1
    return 0


def wait_for_quiet(max_wait_s, window_s=2.0):
    """Block until no other thread has been runnable for window_s (sampled every 0.1 s), or max_wait_s passed.
    On a shared box, one busy neighbour slows 2-thread OpenMP code by far more than 2x (each parallel region
    waits for the descheduled thread), so timings are only comparable when taken quiet. Returns True if quiet."""
    deadline, quiet_since = time.monotonic() + max_wait_s, time.monotonic()
    while True:
        now = time.monotonic()
        if other_runnable() > 0:
            quiet_since = now
        if now - quiet_since >= window_s:
            return True
        if now >= deadline:
            return False
        time.sleep(0.1)


def environment(args) -> dict:
    try:
        import transformers
    except ImportError:  # only the decode baseline needs it
        transformers = None
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"torch": torch.__version__, "transformers": transformers and transformers.__version__, "python": platform.python_version(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg()[0], "argv": sys.argv[1:],
            "args": {k: v for k, v in vars(args).items() if k != "func"}}


def print_table(headers, rows):
    cells = [[str(h) for h in headers]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def finish(args, payload):
    payload["env"]["loadavg_end"] = os.getloadavg()[0]
    print(f"\nload average (1 min): {payload['env']['loadavg_start']:.2f} at start, "
          f"{payload['env']['loadavg_end']:.2f} at end (cores: {os.cpu_count()}); "
          "other jobs on the box make timings noisy")
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")


def int_list(s):
    return [int(x) for x in s.split(",") if x.strip()]


# -----------------------------------------------------------------------------------------------------------
# decode: our generate() vs transformers generate() on the same random weights

def hf_generate(hf, prompts, n, pad_id):
    idx = torch.tensor(prompts)  # equal lengths: no padding needed
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, min_new_tokens=n,
                      max_new_tokens=n, pad_token_id=pad_id)
    return out[:, idx.shape[1]:]


def ours_generate(model, prompts, n, pad_id):
    return ours.generate(model, prompts, n, stop_ids=[], temperature=0.0, pad_id=pad_id).tokens


class StepClock:
    """A forward hook that stamps the end of every forward call. generate() calls forward once per token (the
    prefill, then one call per decode step), so the intervals between stamps are whole decode steps (forward +
    sampling + bookkeeping). Their median is robust to bursts of load from other processes."""

    def __init__(self, module):
        self.stamps = []
        self.handle = module.register_forward_hook(lambda *_: self.stamps.append(time.perf_counter()))

    def reset(self):
        self.stamps = []

    def intervals(self):
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def cmd_decode(args):
    batches = int_list(args.batches or ("1,2" if args.quick else "1,8,32"))
    N = args.new_tokens or (16 if args.quick else 128)
    shape = args.shape or ("tiny" if args.quick else "qwen2.5-0.5b")
    payload = {"command": "decode", "env": environment(args), "shape": shape, "config": SHAPES[shape],
               "new_tokens": N, "prompt_len": args.prompt_len, "results": []}
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as d:
        hf, t_build = wall(lambda: make_random_model(d, shape, seed=args.seed))
        (model, tok), t_load = wall(lambda: ours.load_model(d, dtype=torch.float32, device="cpu"))
    payload["attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
    print(f"shape {shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, fp32, "
          f"{torch.get_num_threads()} threads; built + saved in {t_build:.1f} s, loaded ours in {t_load:.1f} s; "
          f"transformers attn_implementation={payload['attn_implementation']}")
    print(f"greedy, {N} new tokens, {args.prompt_len}-token prompts. tok/s = batch*{N} / wall time of generate "
          f"(prefill included); step tok/s = batch / median decode-step time (prefill excluded)\n")
    sides = {"ours": (model, lambda p, n: ours_generate(model, p, n, tok.pad_id)),
             "transformers": (hf, lambda p, n: hf_generate(hf, p, n, tok.pad_id))}
    clocks = {name: StepClock(module) for name, (module, _) in sides.items()}
    rows = []
    for B in batches:
        prompts = random_prompts(B, args.prompt_len, SHAPES[shape]["vocab_size"], seed=args.seed + B)
        for _, gen in sides.values():  # warm-up
            gen(prompts, 4)
        r = {"batch": B}
        times, steps, outs = {name: [] for name in sides}, {name: [] for name in sides}, {}
        for rep in range(args.repeats):
            for name in (list(sides) if rep % 2 == 0 else list(sides)[::-1]):  # ABBA order: drift hits both
                if args.wait_quiet:
                    r.setdefault("quiet", []).append(wait_for_quiet(args.wait_quiet))
                clocks[name].reset()
                outs[name], dt = wall(lambda: sides[name][1](prompts, N))
                times[name].append(dt)
                steps[name] += clocks[name].intervals()
        for name in sides:
            r[f"{name}_s"] = times[name]
            r[f"{name}_tok_s"] = B * N / min(times[name])
            r[f"{name}_step_ms"] = 1e3 * statistics.median(steps[name])
            r[f"{name}_step_tok_s"] = B / statistics.median(steps[name])
        r["ratio"] = r["ours_tok_s"] / r["transformers_tok_s"]
        r["step_ratio"] = r["ours_step_tok_s"] / r["transformers_step_tok_s"]
        r["greedy_rows_identical"] = int((outs["ours"] == outs["transformers"]).all(-1).sum())
        payload["results"].append(r)
        rows.append([B, r["ours_tok_s"], r["transformers_tok_s"], f"{r['ratio']:.2f}x", r["ours_step_tok_s"],
                     r["transformers_step_tok_s"], f"{r['step_ratio']:.2f}x", f"{r['greedy_rows_identical']}/{B}"])
        print(f"  batch {B}: ours {r['ours_tok_s']:.1f} tok/s, transformers {r['transformers_tok_s']:.1f} tok/s "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
    print()
    print_table(["batch", "ours tok/s", "transformers tok/s", "ratio", "ours step tok/s", "hf step tok/s",
                 "step ratio", "same greedy rows"], rows)
    r8 = next((r for r in payload["results"] if r["batch"] == 8), None)
    if r8:
        print(f"\nbatch 8: ours / transformers = {r8['ratio']:.2f}x wall, {r8['step_ratio']:.2f}x per step "
              "(target >= 1.2x)")
    finish(args, payload)
    return payload


# -----------------------------------------------------------------------------------------------------------
# window: per-token decode time versus generation length, full vs window cache

@torch.no_grad()
def step_times(model, prompts, n_tokens, windows):
    """model.generate's decode loop (greedy, no stop) with a timer around each step, run in lockstep for several
    caches: windows maps mode name -> window (None = full). Interleaving the modes step by step means load from
    other processes hits all modes alike. Returns {mode: (seconds per step (n_tokens,), KV-cache bytes)}.
    Step t feeds thought token t: the cache then holds t + 1 thought tokens (window mode: at most W)."""
    idx, plens = ours.left_pad(prompts, 0, "cpu")
    caches = {mode: model.new_cache(plens, n_tokens, w) for mode, w in windows.items()}
    logits = {mode: model(idx, cache)[:, -1] for mode, cache in caches.items()}  # prefill
    times = {mode: [] for mode in windows}
    for _ in range(n_tokens):
        for mode, cache in caches.items():
            t0 = time.perf_counter()
            tok = logits[mode].argmax(-1)
            if cache.needs_evict():
                cache.evict()
            logits[mode] = model(tok[:, None], cache)[:, -1]
            times[mode].append(time.perf_counter() - t0)
    return {mode: (times[mode], caches[mode].nbytes()) for mode in windows}


def cmd_window(args):
    lengths = int_list(args.lengths or ("128,256" if args.quick else "1024,2048,4096,8192"))
    W = args.window or (32 if args.quick else 512)
    S = args.slice or (32 if args.quick else 256)
    shape = args.shape or ("tiny" if args.quick else "small")
    payload = {"command": "window", "env": environment(args), "shape": shape, "config": SHAPES[shape],
               "lengths": lengths, "window": W, "slice": S, "batch": args.batch, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="bench_window_") as d:
        make_random_model(d, shape, seed=args.seed)
        model, _ = ours.load_model(d, dtype=torch.float32, device="cpu")
    prompts = random_prompts(args.batch, args.prompt_len, SHAPES[shape]["vocab_size"], seed=args.seed)
    n = max(lengths)
    print(f"shape {shape}, batch {args.batch}, {args.prompt_len}-token prompts, fp32, {torch.get_num_threads()} "
          f"threads; one run of {n} tokens per mode; ms/token = mean over the {S} steps ending at each length\n")
    step_times(model, prompts, min(n, 2 * W), {"full": None, "window": W})  # warm-up
    if args.wait_quiet:
        payload["quiet"] = wait_for_quiet(args.wait_quiet)
    runs, dt = wall(lambda: step_times(model, prompts, n, {"full": None, "window": W}))
    print(f"  {n} tokens x 2 modes (interleaved step by step) in {dt:.1f} s", flush=True)
    for mode, (times, nbytes) in runs.items():
        at = {}
        for L in lengths:
            sl = times[max(0, L - S):L]
            at[L] = {"mean_ms": 1e3 * statistics.mean(sl), "median_ms": 1e3 * statistics.median(sl)}
        payload["modes"][mode] = {"kv_bytes": nbytes, "total_s": sum(times), "ms_per_token": at,
                                  "ratio_last_first": at[lengths[-1]]["mean_ms"] / at[lengths[0]]["mean_ms"]}
    print()
    f, w = payload["modes"]["full"], payload["modes"]["window"]
    rows = [[f"{L}", f["ms_per_token"][L]["mean_ms"], w["ms_per_token"][L]["mean_ms"],
             f["ms_per_token"][L]["median_ms"], w["ms_per_token"][L]["median_ms"],
             f"{f['ms_per_token'][L]['mean_ms'] / w['ms_per_token'][L]['mean_ms']:.2f}x"] for L in lengths]
    print_table(["length", "full ms/tok", "window ms/tok", "full median", "window median", "full/window"], rows)
    lo, hi = lengths[0], lengths[-1]
    print(f"\nms/token at {hi} / at {lo}: full {f['ratio_last_first']:.2f}x, window {w['ratio_last_first']:.2f}x "
          f"(target: window within 1.10x, full grows)")
    print(f"KV-cache bytes: full {f['kv_bytes'] / 2**20:.2f} MiB (capacity prompt + {n}), "
          f"window {w['kv_bytes'] / 2**20:.2f} MiB (prompt + W={W})")
    finish(args, payload)
    return payload


# -----------------------------------------------------------------------------------------------------------
# replay: peak memory and time of one replay + backward step per method versus completion length (pte.py),
# the constant KV-cache bytes of a long windowed generation, and (CUDA) the paper's memory claim at 3B scale.

REPLAY_SHAPES = {  # ModelConfig fields; built directly with random weights (no transformers, no files)
    "replay-small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, n_layers=8, n_heads=8,
                         n_kv_heads=2, head_dim=64),
    "qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, n_layers=36, n_heads=16,
                       n_kv_heads=2, head_dim=128),
    "replay-tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, n_layers=2, n_heads=4,
                        n_kv_heads=2, head_dim=16),
}


def random_transformer(shape, dtype, device, seed=0):
    from model import ModelConfig, Transformer
    cfg = ModelConfig(arch="qwen2", rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None, attention_bias=True,
                      tie_word_embeddings=True, **REPLAY_SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        m = Transformer(cfg)
    return m.to(dtype).eval().requires_grad_(False)


def peak_tensor_memory(fn, device="cpu"):
    """-> (fn(), peak bytes of tensors allocated during the call). CUDA: max_memory_allocated above the level before.
    CPU: torch.profiler's allocation events replayed in order (exact tensor accounting, unlike sampled RSS)."""
    if torch.device(device).type == "cuda":
        return measure_peak_memory(fn, device)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return out, peak


def cmd_replay(args):
    from pte import AdapterConfig, Adapters, replay
    dev, dtype = args.device, {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    env = environment(args)
    if args.quick:
        args.shape, args.lengths, args.window, args.gen_tokens = "replay-tiny", "64,128", 16, 256
    lengths, methods = int_list(args.lengths), args.methods.split(",")
    rows, res = [], {}
    for method in methods:
        model = random_transformer(args.shape, dtype, dev)
        ad = Adapters(model, AdapterConfig(method=method, rank=32, n_global=32))
        g = torch.Generator(device="cpu").manual_seed(0)
        with torch.no_grad():  # non-zero adapters, as after training
            for p in ad.parameters():
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.02)
        window = None if method == "lora" else args.window
        prompts = random_prompts(args.batch, args.prompt_len, model.cfg.vocab_size)
        for T in lengths:
            if method == "lora" and T > args.lora_max:
                rows.append([method, T, "-", "-", "(skipped: --lora-max)"])
                continue
            tokens = torch.randint(0, model.cfg.vocab_size, (args.batch, T), generator=g)
            run = lambda: replay(model, ad, prompts, tokens, window, 1.0, loss_fn=lambda lp, t0, t1: -lp.mean())
            _, peak = peak_tensor_memory(run, dev)
            _, secs = wall(run)
            ad.zero_grad(set_to_none=True)
            res.setdefault(method, {})[T] = {"peak_bytes": peak, "seconds": secs}
            rows.append([method, T, f"{peak / 2**20:.1f}", f"{secs:.2f}", f"{args.batch * T / secs:.0f}"])
            print(f"  {method} T={T}: peak {peak / 2**20:.1f} MiB, {secs:.2f} s", flush=True)
        del model, ad
    print_table(["method", "tokens", "peak MiB", "seconds", "tok/s"], rows)
    ratios = {}
    for m in methods:
        ts = sorted(res.get(m, {}))
        if len(ts) > 1:
            ratios[f"{m} peak {ts[-1]}/{ts[0]}"] = res[m][ts[-1]]["peak_bytes"] / res[m][ts[0]]["peak_bytes"]
    for T in lengths:
        if T in res.get("pte", {}) and T in res.get("lora", {}):
            ratios[f"pte/lora peak at {T}"] = res["pte"][T]["peak_bytes"] / res["lora"][T]["peak_bytes"]
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    # KV-cache bytes while generating --gen-tokens tokens: constant in window mode
    model = random_transformer(args.shape, dtype, dev)
    kv = {}
    for name, w in (("window", args.window), ("full", None)):
        c = model.new_cache([args.prompt_len] * args.batch, args.gen_tokens, w)
        kv[name] = c.nbytes()
    print(f"KV cache for {args.gen_tokens} generated tokens (batch {args.batch}): window {kv['window'] / 2**20:.1f} "
          f"MiB (constant), full {kv['full'] / 2**20:.1f} MiB")
    rollout = {}
    if args.rollout_tokens:
        ad = Adapters(model, AdapterConfig(method="pte", rank=32, n_global=32))
        prompts = random_prompts(args.batch, args.prompt_len, model.cfg.vocab_size)
        for method in methods:
            ad.cfg.method = method
            w = None if method == "lora" else args.window
            out, secs = wall(lambda: ours.generate(model, prompts, args.rollout_tokens, [], 1.0, 1.0, w,
                                                   adapter=ad))
            rollout[method] = args.batch * args.rollout_tokens / secs
            print(f"rollout {method}: {rollout[method]:.0f} tok/s ({args.rollout_tokens} tokens, batch {args.batch})")
    finish(args, {"env": env, "command": "replay", "shape": args.shape, "replay": res, "ratios": ratios, "kv_bytes": kv, "rollout_tok_s": rollout})


# -----------------------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true", help="smoke run: tiny shape, few tokens (< 30 s)")
    common.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    common.add_argument("--shape", choices=sorted(SHAPES), default=None, help="model shape")
    common.add_argument("--prompt-len", type=int, default=32)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--out", default=None, help="write results as JSON to this file (default: print only)")
    common.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="before each timed run, wait up to S seconds for no other runnable thread on the box")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("decode", parents=[common], help="our generate vs transformers generate (tok/s)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per sequence (default 128)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per side and batch; the fastest is kept")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("window", parents=[common], help="ms/token vs generation length, full vs window cache")
    p.add_argument("--lengths", default=None, help="comma-separated lengths (default 1024,2048,4096,8192)")
    p.add_argument("--window", type=int, default=None, help="thought window W (default 512)")
    p.add_argument("--slice", type=int, default=None, help="steps averaged per length (default 256)")
    p.add_argument("--batch", type=int, default=1)
    p.set_defaults(func=cmd_window)

    p = sub.add_parser("replay", help="peak memory and time of one replay + backward step per method vs length")
    p.add_argument("--shape", choices=sorted(REPLAY_SHAPES), default="replay-small",
                   help="replay-small (hidden 512, 8 layers) | qwen2.5-3b (use with --device cuda --dtype bfloat16)")
    p.add_argument("--lengths", default="2048,4096,8192,16384", help="completion lengths")
    p.add_argument("--window", type=int, default=512, help="thought window W of lora_c and pte")
    p.add_argument("--methods", default="lora,lora_c,pte")
    p.add_argument("--lora-max", type=int, default=8192, help="skip lora (full cache) above this length")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=16384, help="generation length for the KV-cache bytes line")
    p.add_argument("--rollout-tokens", type=int, default=0, help="also time generate() per method (tokens)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny shape, short lengths")
    p.set_defaults(func=cmd_replay)

    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
