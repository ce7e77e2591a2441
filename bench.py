"""
bench.py: benchmarks of model.py / cache.py / pte.py (CPU, and CUDA where said). A benchmark script, not a
test: it prints tables and ratios against a baseline measured in the same process, and writes JSON with --out.

    python bench.py decode             # ours vs transformers generate, Qwen2.5-0.5B shape, fp32, 2 threads,
                                       #   batch 1, 8, 32, 128 new tokens, greedy, 32-token prompts (minutes)
    python bench.py decode --batches 8 --new-tokens 64 --repeats 2 --wait-quiet 120 --out decode.json
    python bench.py decode --device cuda --dtype bfloat16 --shape qwen2.5-3b
                                       # GPU: static+graph vs dynamic vs
                                       #   transformers, batch 1, 64, 256, full and W=768, 64-token prompts
    python bench.py grpo-step --device cuda --dtype bfloat16 --shape qwen2.5-3b  # one GRPO step per method
    python bench.py window             # ms/token at 1K, 2K, 4K, 8K generated tokens, full vs window (W=512)
    python bench.py window --lengths 1024,4096 --window 256 --batch 4 --out window.json
    python bench.py decode --quick     # smoke runs: tiny shapes, a few tokens (< 30 s each)
    python bench.py window --quick
    python bench.py grpo-step --shape tiny   # CPU smoke run

decode  Both sides run the SAME random weights: a transformers Qwen2ForCausalLM(Qwen2Config(shape)) is built
        in-process and ours holds the very same tensors (model.from_state_dict; on CPU column-major copies).
        Throughput = batch * new_tokens / wall time of one whole generate call, i.e. the prefill is included
        on every side. Sides (--sides): ours with the static step (a CUDA graph on CUDA; eager on CPU), ours
        with the dynamic step (the CPU default), transformers (full cache only: it has no window). Beside each
        figure, the fraction of the bandwidth roofline batch / ((weight bytes + KV bytes read per step) /
        --bandwidth). On CPU the "step" column is batch / median time of one decode step (a forward hook
        stamps every forward call: prefill excluded, robust to bursts of load). Warm-up: one short generate
        per side, batch and cache before timing. With --repeats R the sides run in ABBA order and the
        fastest run of each is kept, so slow drift of the box's load hits every side alike.
grpo-step  One GRPO-like step per method (lora: full cache; lora_c, pte: window W) on random weights with
        forced lengths (no stop ids): rollout seconds (generate at temperature 1), replay + backward seconds
        (pte.replay with a signed per-response loss), peak memory of each, and the linear projection of the
        step to the paper's 512 responses x 3,072 tokens on one device.
window  Per-token decode time versus generation length, cache mode "full" and "window" (model.generate's
        loop, re-written here with a timer around each step: needs_evict() -> evict() -> model(tok, cache)).
        One run of max(lengths) tokens per mode, the two modes interleaved step by step (so load from other
        processes hits both alike); the reported ms/token at length L is the mean over the
        --slice steps ending at L (a multiple of the eviction period ceil(W/4), so it holds the same number
        of eviction events at every L). Also reports the KV-cache bytes of each mode (KVCache.nbytes()).
replay  Peak memory (CUDA: max_memory_allocated; CPU: torch.profiler allocation events, exact) and time of one
        pte.replay + backward step per method and completion length, on random weights built in-process:
            python bench.py replay                              # hidden 512, 8 layers, W=512, 2K..16K tokens
            python bench.py replay --device cuda --dtype bfloat16 --shape qwen2.5-3b --lengths 1024,3072 \
                --window 1024 --batch 4 --rollout-tokens 1024    # the paper's memory claim at 3B scale
        Also the KV-cache bytes of a --gen-tokens generation (constant in window mode).

Timings on a shared 2-core box are noisy: one busy neighbour slows 2-thread runs several-fold. The load
average before and after each run is printed and saved; --wait-quiet S waits (up to S s) for an idle box
before each timed run, and the per-step medians of `decode` are robust to short bursts.
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

# The one shape table: transformers Qwen2Config keyword arguments (Qwen2 always has q/k/v biases; ours gets
# the same shape through model.ModelConfig.from_hf, see model_config).
SHAPES = {
    "qwen2.5-3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                       rms_norm_eps=1e-6, max_position_embeddings=32768),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                         rms_norm_eps=1e-6, max_position_embeddings=32768),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=1024, vocab_size=1024, tie_word_embeddings=True, rope_theta=1e6,
                  rms_norm_eps=1e-6, max_position_embeddings=32768),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True, rope_theta=1e6,
                 rms_norm_eps=1e-6, max_position_embeddings=32768),
    "replay-small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=1536, vocab_size=32000, tie_word_embeddings=True, rope_theta=1e6,
                         rms_norm_eps=1e-6, max_position_embeddings=32768),
}
SHAPES["replay-tiny"] = SHAPES["tiny"]  # the name `replay --quick` has always used
DTYPES = {k: ours.DTYPES[k] for k in ("float32", "bfloat16", "float64")}  # the dtypes the benchmarks support
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


def model_config(shape) -> "ours.ModelConfig":
    return ours.ModelConfig.from_hf({"architectures": ["Qwen2ForCausalLM"], **SHAPES[shape]})


def hf_random_model(shape, dtype, device, seed=0):
    """A random transformers Qwen2ForCausalLM of the named shape, built in-process on `device` (no files: the
    3B shape on a GPU in seconds), and ours on the very same weight tensors (model.from_state_dict; on CPU
    ours keeps column-major copies). -> (hf, ours)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    ids = {s: 256 + i for i, s in enumerate(SPECIALS)}  # write_tokenizer's ids
    cfg = Qwen2Config(**SHAPES[shape], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                      pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(seed)
    with torch.device(device):
        hf = Qwen2ForCausalLM(cfg)
    hf = hf.to(dtype).eval().requires_grad_(False)
    return hf, ours.from_state_dict(model_config(shape), hf.state_dict(), device)


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
    CUDA: torch.cuda.max_memory_allocated (allocator-exact). CPU: the process's resident set size, sampled
    every interval_s by a background thread (coarse: misses spikes shorter than the interval, and memory freed
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
    waits for the descheduled thread), so timings are only comparable when taken quiet.
    Returns True if quiet."""
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
    return {"torch": torch.__version__, "transformers": transformers and transformers.__version__,
            "python": platform.python_version(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()[0], "argv": sys.argv[1:],
            "args": {k: v for k, v in vars(args).items() if k != "func"}}


def print_table(headers, rows):
    cells = [[str(h) for h in headers]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r]
                                           for r in rows]
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
    idx = torch.tensor(prompts, device=hf.device)  # equal lengths: no padding needed
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, min_new_tokens=n,
                      max_new_tokens=n, pad_token_id=pad_id)
    return out[:, idx.shape[1]:]


class StepClock:
    """A forward hook that stamps the end of every forward call. generate() calls forward once per token (the
    prefill, then one call per decode step), so the intervals between stamps are whole decode steps (forward +
    sampling + bookkeeping). Their median is robust to bursts of load from other processes. CPU only: on CUDA
    the stamps would time kernel launches, and a replayed CUDA graph calls no forward at all."""

    def __init__(self, module):
        self.stamps = []
        self.handle = module.register_forward_hook(lambda *_: self.stamps.append(time.perf_counter()))

    def reset(self):
        self.stamps = []

    def intervals(self):
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def roofline_tok_s(model, batch, prompt_len, n_new, window, bandwidth):
    """Decode tokens/s if every step only streamed the weights and the KV cache it must read at `bandwidth`
    B/s: batch / ((weight bytes + KV bytes read per step) / bandwidth), KV bytes averaged over the n_new steps
    (a step reads the prompt and the thoughts held, at most W of them in window mode)."""
    c = model.cfg
    per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * next(model.parameters()).element_size()
    held = statistics.mean(prompt_len + (t if window is None else min(t, window)) for t in range(n_new))
    return batch * bandwidth / (param_bytes(model) + batch * per_token * held)


DECODE_SIDES = {  # name -> (label, generate keyword arguments); "hf" is transformers.generate
    "static": ("ours static+graph", dict(static=True, cuda_graph=True)),  # on CPU: the static step, eagerly
    "dynamic": ("ours dynamic", dict(static=False)),
    "hf": ("transformers", None),
}


def cmd_decode(args):
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    batches = int_list(args.batches or ("1,2" if args.quick else "1,64,256" if cuda else "1,8,32"))
    N = args.new_tokens or (16 if args.quick else 128)
    shape = args.shape or ("tiny" if args.quick else "qwen2.5-3b" if cuda else "qwen2.5-0.5b")
    plen = args.prompt_len or (64 if cuda else 32)
    repeats = args.repeats or (3 if cuda else 1)
    windows = [None if w == "full" else int(w)
               for w in (args.windows or ("full,768" if cuda else "full")).split(",")]
    names = (args.sides or ("static,dynamic,hf" if cuda else "dynamic,hf")).split(",")
    if any(n not in DECODE_SIDES for n in names):
        raise SystemExit(f"error: --sides takes {','.join(DECODE_SIDES)} (got {args.sides})")
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    payload = {"command": "decode", "env": environment(args), "shape": shape, "config": SHAPES[shape],
               "device": str(dev), "dtype": str(dtype), "new_tokens": N, "prompt_len": plen,
               "bandwidth": args.bandwidth, "results": []}
    if cuda:
        payload["env"]["gpu"] = torch.cuda.get_device_name(dev)
    (hf, model), t_build = wall(lambda: hf_random_model(shape, dtype, dev, seed=args.seed))
    pad_id = 256  # <|endoftext|>
    payload["attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
    print(f"shape {shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"{args.dtype or dtype}, "
          f"{dev}{' (' + payload['env']['gpu'] + ')' if cuda else f', {torch.get_num_threads()} threads'}; "
          f"built in {t_build:.1f} s; transformers attn_implementation={payload['attn_implementation']}")
    print(f"greedy, {N} new tokens, {plen}-token prompts, best of {repeats} interleaved runs. "
          f"tok/s = batch*{N} / wall time of generate (prefill included)"
          f"{'; step tok/s = batch / median decode step (CPU)' if not cuda else ''}"
          f"; roofline = batch / ((weights + KV read per step) / {args.bandwidth:.2g} B/s)\n")

    def run(name, prompts, n, window):
        if name == "hf":
            return hf_generate(hf, prompts, n, pad_id)
        return ours.generate(model, prompts, n, stop_ids=[], window=window, pad_id=pad_id,
                             **DECODE_SIDES[name][1]).tokens

    clocks = {} if cuda else {"hf": StepClock(hf), **{n: StepClock(model) for n in names if n != "hf"}}
    rows = []
    for B in batches:
        prompts = random_prompts(B, plen, SHAPES[shape]["vocab_size"], seed=args.seed + B)
        for window in windows:
            sides = [n for n in names if n != "hf" or window is None]  # transformers: full cache only
            for n in sides:  # warm-up (and CUDA graph code paths exercised once)
                run(n, prompts, 4, window)
            times, steps, outs = {n: [] for n in sides}, {n: [] for n in sides}, {}
            for rep in range(repeats):
                for n in (sides if rep % 2 == 0 else sides[::-1]):  # ABBA order: drift hits every side alike
                    if args.wait_quiet:
                        wait_for_quiet(args.wait_quiet)
                    if n in clocks:
                        clocks[n].reset()
                    outs[n], dt = wall(lambda: run(n, prompts, N, window))
                    times[n].append(dt)
                    if n in clocks:
                        steps[n] += clocks[n].intervals()
            roof = roofline_tok_s(model, B, plen, N, window, args.bandwidth)
            ref = outs.get("hf", outs.get("dynamic"))
            for n in sides:
                r = {"batch": B, "window": window, "side": n, "seconds": times[n],
                     "tok_s": B * N / min(times[n]), "roofline_tok_s": roof}
                r["roofline_frac"] = r["tok_s"] / roof
                if steps[n]:
                    r["step_tok_s"] = B / statistics.median(steps[n])
                r["same_greedy_rows"] = int((outs[n].to(ref.device) == ref).all(-1).sum())
                payload["results"].append(r)
                rows.append([B, "full" if window is None else f"W={window}", DECODE_SIDES[n][0], r["tok_s"],
                             f"{r['step_tok_s']:.2f}" if "step_tok_s" in r else "-",
                             f"{100 * r['roofline_frac']:.3g}%", f"{r['same_greedy_rows']}/{B}"])
            print(f"  batch {B} {'full' if window is None else f'W={window}'}: " + ", ".join(
                f"{n} {B * N / min(times[n]):.1f} tok/s" for n in sides) + f" (roofline {roof:.0f})",
                  flush=True)
    print()
    print_table(["batch", "cache", "side", "tok/s", "step tok/s", "of roofline",
                 f"same greedy rows as {'transformers' if 'hf' in names else 'dynamic'}"], rows)
    res = {(r["batch"], r["window"], r["side"]): r for r in payload["results"]}
    for B in batches:
        for a, b in (("dynamic", "hf"), ("static", "dynamic")):
            if (B, None, a) in res and (B, None, b) in res:
                ratio = res[B, None, a]["tok_s"] / res[B, None, b]["tok_s"]
                print(f"batch {B}, full cache: {DECODE_SIDES[a][0]} / {DECODE_SIDES[b][0]} = {ratio:.2f}x")
    finish(args, payload)
    return payload


# -----------------------------------------------------------------------------------------------------------
# window: per-token decode time versus generation length, full vs window cache

@torch.no_grad()
def step_times(model, prompts, n_tokens, windows):
    """model.generate's decode loop (greedy, no stop) with a timer around each step, run in lockstep for
    several caches: windows maps mode name -> window (None = full). Interleaving the modes step by step means
    load from other processes hits all modes alike.
    Returns {mode: (seconds per step (n_tokens,), KV-cache bytes)}.
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
    args.prompt_len = args.prompt_len or 32
    prompts = random_prompts(args.batch, args.prompt_len, SHAPES[shape]["vocab_size"], seed=args.seed)
    n = max(lengths)
    print(f"shape {shape}, batch {args.batch}, {args.prompt_len}-token prompts, fp32, "
          f"{torch.get_num_threads()} threads; one run of {n} tokens per mode; "
          f"ms/token = mean over the {S} steps ending at each length\n")
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
    print_table(["length", "full ms/tok", "window ms/tok", "full median", "window median", "full/window"],
                rows)
    lo, hi = lengths[0], lengths[-1]
    print(f"\nms/token at {hi} / at {lo}: full {f['ratio_last_first']:.2f}x, "
          f"window {w['ratio_last_first']:.2f}x (target: window within 1.10x, full grows)")
    print(f"KV-cache bytes: full {f['kv_bytes'] / 2**20:.2f} MiB (capacity prompt + {n}), "
          f"window {w['kv_bytes'] / 2**20:.2f} MiB (prompt + W={W})")
    finish(args, payload)
    return payload


# -----------------------------------------------------------------------------------------------------------
# replay: peak memory and time of one replay + backward step per method versus completion length (pte.py),
# the constant KV-cache bytes of a long windowed generation, and (CUDA) the paper's memory claim at 3B scale.

def random_transformer(shape, dtype, device, seed=0):
    """Ours alone with random weights (no transformers, no files)."""
    from model import Transformer
    torch.manual_seed(seed)
    with torch.device(device):
        m = Transformer(model_config(shape))
    return m.to(dtype).eval().requires_grad_(False)


def peak_tensor_memory(fn, device="cpu"):
    """-> (fn(), peak bytes of tensors allocated during the call). CUDA: max_memory_allocated above the level
    before. CPU: torch.profiler's allocation events replayed in order (exact tensor accounting, unlike
    sampled RSS)."""
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
    dev, dtype = args.device, DTYPES[args.dtype]
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
            run = lambda: replay(model, ad, prompts, tokens, window, 1.0,
                                 loss_fn=lambda lp, t0, t1: -lp.mean())
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
    print(f"KV cache for {args.gen_tokens} generated tokens (batch {args.batch}): "
          f"window {kv['window'] / 2**20:.1f} MiB (constant), full {kv['full'] / 2**20:.1f} MiB")
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
            print(f"rollout {method}: {rollout[method]:.0f} tok/s "
                  f"({args.rollout_tokens} tokens, batch {args.batch})")
    finish(args, {"env": env, "command": "replay", "shape": args.shape, "replay": res, "ratios": ratios,
                  "kv_bytes": kv, "rollout_tok_s": rollout})


# -----------------------------------------------------------------------------------------------------------
# grpo-step: one GRPO-like step per method (rollout, then replay + backward) on random weights, forced lengths

PAPER_STEP = (512, 3072)  # responses x new tokens of one of the paper's GRPO steps


def timed_peak(fn, device):
    """-> (fn(), seconds, peak bytes above the level before). CUDA: one run. CPU: the profiler's exact
    accounting slows the run, so a second, unprofiled run is timed."""
    if torch.device(device).type == "cuda":
        (out, peak), secs = wall(lambda: measure_peak_memory(fn, device))
        return out, secs, peak
    _, peak = peak_tensor_memory(fn, device)
    out, secs = wall(fn)
    return out, secs, peak


def cmd_grpo_step(args):
    from pte import AdapterConfig, Adapters, replay
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    shape = args.shape or ("qwen2.5-3b" if cuda else "tiny")
    big = cuda and not args.quick
    B, N = args.batch or (16 if big else 4), args.new_tokens or (3072 if big else 64)
    W, plen = args.window or (1024 if big else 16), args.prompt_len or (256 if big else 16)
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    model = random_transformer(shape, dtype, dev, seed=args.seed)
    # lora/lora_c: the same LoRA, S = I
    ad = Adapters(model, AdapterConfig(method="pte", rank=32, n_global=32))
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    with torch.no_grad():  # non-zero adapters, as after training
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.02)
    prompts = random_prompts(B, plen, model.cfg.vocab_size, seed=args.seed)
    adv = torch.randn(B, generator=g).to(dev)  # GRPO-like advantages: a signed, per-response weight
    print(f"shape {shape}, {str(dtype)[6:]}, {dev}; batch {B}, {plen}-token prompts, {N} new tokens forced "
          f"(no stop ids), W = {W} for lora_c and pte; sampling at temperature 1 "
          f"({'static decode' if cuda else 'dynamic decode'})\n")
    rows, res = [], {}
    for method in args.methods.split(","):
        ad.cfg.method = method
        window = None if method == "lora" else W

        def rollout(n=N):
            gen = torch.Generator(device=dev).manual_seed(args.seed)
            return ours.generate(model, prompts, n, [], 1.0, 1.0, window, adapter=ad, generator=gen)

        def train(tokens):
            out = replay(model, ad, prompts, tokens, window, 1.0,
                         loss_fn=lambda lp, t0, t1: -(lp * adv[:, None]).sum() / lp.new_tensor(B * N))
            ad.zero_grad(set_to_none=True)
            return out

        train(rollout(8).tokens)  # warm-up: kernels, allocator, cuBLAS
        gen, t_roll, peak_roll = timed_peak(rollout, dev)
        assert int(gen.lengths.min()) == N  # forced lengths
        _, t_train, peak_train = timed_peak(lambda: train(gen.tokens), dev)
        scale = PAPER_STEP[0] * PAPER_STEP[1] / (B * N)
        r = {"rollout_s": t_roll, "replay_backward_s": t_train, "rollout_peak_bytes": peak_roll,
             "replay_peak_bytes": peak_train, "rollout_tok_s": B * N / t_roll, "kv_bytes": gen.kv_bytes,
             "paper_step_projection_s": (t_roll + t_train) * scale}
        res[method] = r
        rows.append([method, "full" if window is None else W, t_roll, t_train, f"{r['rollout_tok_s']:.0f}",
                     f"{peak_roll / 2**20:.1f}", f"{peak_train / 2**20:.1f}",
                     f"{r['paper_step_projection_s'] / 3600:.2f}"])
        print(f"  {method}: rollout {t_roll:.2f} s, replay + backward {t_train:.2f} s", flush=True)
    print()
    print_table(["method", "cache", "rollout s", "replay+bwd s", "rollout tok/s", "rollout peak MiB",
                 "replay peak MiB", f"paper step h ({PAPER_STEP[0]}x{PAPER_STEP[1]})"], rows)
    print(f"\npaper step: linear projection of this step's seconds to {PAPER_STEP[0]} responses x "
          f"{PAPER_STEP[1]} tokens on one device (x {PAPER_STEP[0] * PAPER_STEP[1] / (B * N):.0f}); "
          "ignores batching gains and lora's attention growing with length")
    finish(args, {"env": environment(args), "command": "grpo-step", "shape": shape, "device": str(dev),
                  "batch": B, "new_tokens": N, "window": W, "prompt_len": plen, "results": res})


# -----------------------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true", help="smoke run: tiny shape, few tokens (< 30 s)")
    common.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    common.add_argument("--shape", choices=sorted(SHAPES), default=None, help="model shape")
    common.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: per command)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--out", default=None, help="write results as JSON to this file "
                        "(default: print only)")
    common.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="before each timed run, wait up to S seconds for no other runnable thread "
                             "on the box")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("decode", parents=[common], help="our generate vs transformers generate (tok/s)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes "
                   "(default 1,8,32; CUDA 1,64,256)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per sequence (default 128)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per side and batch, "
                   "the fastest kept (default 1; CUDA 3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default float32 (CPU), "
                   "bfloat16 (CUDA)")
    p.add_argument("--windows", default=None, help="comma-separated caches: full and/or W "
                   "(default full; CUDA full,768)")
    p.add_argument("--sides", default=None, help="static,dynamic,hf: ours with the static step "
                   "(CUDA graph on CUDA, eager on CPU), ours with the dynamic step, transformers "
                   "(default CPU dynamic,hf; CUDA all)")
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="memory bandwidth of the roofline, "
                   "B/s (H100: 3e12)")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("grpo-step", parents=[common], help="one GRPO-like step per method: "
                       "rollout, replay + backward")
    p.add_argument("--batch", type=int, default=None, help="responses (default 16; CPU 4)")
    p.add_argument("--new-tokens", type=int, default=None, help="forced completion length "
                   "(default 3072; CPU 64)")
    p.add_argument("--window", type=int, default=None, help="W of lora_c and pte (default 1024; CPU 16)")
    p.add_argument("--methods", default="lora,lora_c,pte")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default float32 (CPU), "
                   "bfloat16 (CUDA)")
    p.set_defaults(func=cmd_grpo_step)

    p = sub.add_parser("window", parents=[common], help="ms/token vs generation length, full vs window cache")
    p.add_argument("--lengths", default=None, help="comma-separated lengths (default 1024,2048,4096,8192)")
    p.add_argument("--window", type=int, default=None, help="thought window W (default 512)")
    p.add_argument("--slice", type=int, default=None, help="steps averaged per length (default 256)")
    p.add_argument("--batch", type=int, default=1)
    p.set_defaults(func=cmd_window)

    p = sub.add_parser("replay", help="peak memory and time of one replay + backward step "
                       "per method vs length")
    p.add_argument("--shape", choices=sorted(SHAPES), default="replay-small",
                   help="replay-small (hidden 512, 8 layers) | "
                        "qwen2.5-3b (use with --device cuda --dtype bfloat16)")
    p.add_argument("--lengths", default="2048,4096,8192,16384", help="completion lengths")
    p.add_argument("--window", type=int, default=512, help="thought window W of lora_c and pte")
    p.add_argument("--methods", default="lora,lora_c,pte")
    p.add_argument("--lora-max", type=int, default=8192, help="skip lora (full cache) above this length")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=16384, help="generation length for "
                   "the KV-cache bytes line")
    p.add_argument("--rollout-tokens", type=int, default=0, help="also time generate() per method (tokens)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
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
