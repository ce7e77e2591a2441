"""
eval.py: accuracy and efficiency of a base model or of trained adapters (lora, lora_c, pte) on the math
benchmarks, under the full KV cache or the paper's sliding-window cache policy D, in the layout of Table 1 and
Figure 3 (the protocol is README choice 15).

  python eval.py --window 768                                           # the newest runs/ checkpoint
  python eval.py --model Qwen/Qwen2.5-3B-Instruct                       # base model, full cache, 6 benchmarks
  python eval.py --model Qwen/Qwen2.5-3B-Instruct --adapter runs/pte --window 1024
  python eval.py --model M --adapter runs/pte --window 768,1024,2048,3072,full
                                                                        # sweep + accuracy_vs_window.png
  python eval.py --model M --benchmarks gsm8k --limit 30 --samples 1 --temperature 0 --data-dir ../shared/data

Protocol (the paper's own eval settings were mostly not recovered; these are README choice 15):
  benchmarks  math500, olympiadbench, amc23, aime24, aime25, minerva. The sixth, minerva, is INFERRED.
  samples     aime24/25: 16, reported as pass@16; amc23, olympiadbench: 16, reported as avg@16; the others
              (math500, minerva, gsm8k): 1. --samples K sets K everywhere (AIME then reports pass@K).
  sampling    by model family (name or chat template): Qwen-Instruct T 0.7, top-p 0.8; R1-Distill T 0.6,
              top-p 0.95; --temperature / --top-p override; T 0 = greedy.
              The choice is recorded in results.json.
  length      3072 new tokens. --window default: full for the base model and lora; for lora_c and pte the
              window in the adapter's adapter.json ("window"), else 1024 (the paper's 1K eval cache).
  prompt      the model's chat template around data.build_user_message(problem, style); style: --prompt-style,
              else the adapter's "prompt_style", else "dapo" (README choice 14).
  metrics     avg@K: the mean over problems of the fraction of the K samples that are correct (the pass@1
              estimate), with its standard error over problems; pass@k = mean of 1 - C(n-c,k)/C(n,k) per
              problem; Avg = the mean of the per-benchmark headline numbers (as the paper's Avg column).
              Efficiency: mean completion length, eviction events per completion, share of completions that
              evicted at all, truncation rate (no stop token) and no-answer rate (nothing extractable,
              truncated included).

Outputs in --out (default runs/eval/<model-basename>, or runs/eval/<model-basename>-<adapter-basename>):
  samples.jsonl  one line per benchmark x problem x sample x window, appended and flushed batch by batch.
                 A rerun generates only what is missing: key = (benchmark, id, sample, window, settings hash);
                 the hash covers model, adapter file, dtype, chat template, prompt style, T, top-p, max tokens
                 and seed (not the batch size, the device, --limit or --samples: a larger rerun reuses what
                 exists).
  results.json   config + metrics, computed from samples.jsonl only, so a resumed run writes the same file,
                 except "timing": tokens/s, peak memory (CUDA: max_memory_allocated; CPU: peak RSS of the
                 process, model included) and KV-cache bytes depend on the machine and on how samples were
                 batched, and the wall clock of this run. Compare results without "timing".
  accuracy_vs_window.png   with a --window list (the shape of Figure 3).
Randomness: every batch gets its own torch.Generator seeded from (seed, the keys of its samples); prompts are
sorted by length (longest first) and batched across problems, samples and benchmarks.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from cache import parse_window
from checkpoint import fingerprint, load_adapters, read_adapter_meta
from data import BENCHMARKS, PROMPT_STYLES, DataError, encode_prompt, grade, load_benchmark
from model import (DEFAULT_MODEL, DTYPES, ModelError, batch_that_fits, generate, load_model, peak_memory,
                   reset_peak_memory)
from pte import AdapterError

PAPER_BENCHMARKS = ("math500", "olympiadbench", "amc23", "aime24", "aime25", "minerva")
DEFAULT_SAMPLES = {"aime24": 16, "aime25": 16, "amc23": 16, "olympiadbench": 16}  # every other benchmark: 1
PASS_HEADLINE = ("aime24", "aime25")  # reported as pass@K; the others as avg@K
FAMILY_SAMPLING = {"qwen-instruct": (0.7, 0.8), "r1-distill": (0.6, 0.95), "unknown": (0.7, 0.8)}
SIXTH_NOTE = "minerva as the sixth benchmark is inferred (README choice 15), not confirmed by the paper"


class EvalError(ValueError):
    """Bad command-line input. One-line message."""


# -----------------------------------------------------------------------------------------------------------
# metrics

def pass_at_k(n, c, k):
    """Unbiased pass@k of one problem with c correct among n samples: 1 - C(n-c, k) / C(n, k), computed as the
    numerically stable product 1 - prod_{i=n-c+1..n} (1 - k/i) (Chen et al. 2021)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_k(correct):
    """correct: per problem, a list of 0/1 over its samples -> (mean over problems of the per-problem mean,
    standard error of that mean over problems: sample std (ddof 1) / sqrt(N); 0 for a single problem)."""
    per = [sum(c) / len(c) for c in correct]
    mean = sum(per) / len(per)
    if len(per) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((p - mean) ** 2 for p in per) / (len(per) - 1) / len(per))


def window_label(w):
    return "full" if w is None else str(w)


def summarize(records, benchmarks, windows):
    """Sample lines -> (metrics, timing). metrics[window][benchmark] holds accuracy and efficiency; every
    value is a function of the lines alone. timing[window] holds the measured tokens/s, peak memory and
    KV-cache bytes."""
    metrics, timing = {}, {}
    for w in map(window_label, windows):
        rows = [r for r in records if str(r["window"]) == w]
        per_b = {}
        for b in benchmarks:
            probs = {}
            for r in rows:
                if r["benchmark"] == b:
                    probs.setdefault(r["id"], []).append(r)
            correct = [[int(r["correct"]) for r in rs] for rs in probs.values()]
            K = max(len(c) for c in correct)
            avg, se = avg_at_k(correct)
            ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, K) if k <= min(map(len, correct))})
            pk = {str(k): sum(pass_at_k(len(c), sum(c), k) for c in correct) / len(correct) for k in ks}
            head = f"pass@{K}" if b in PASS_HEADLINE and str(K) in pk else f"avg@{K}"
            bs = [r for rs in probs.values() for r in rs]
            per_b[b] = {"problems": len(correct), "samples": K, "avg": avg, "stderr": se, "pass@k": pk,
                        "headline": head, "score": pk[str(K)] if head.startswith("pass") else avg,
                        **efficiency(bs)}
        metrics[w] = {"benchmarks": per_b, "avg": sum(m["score"] for m in per_b.values()) / len(per_b),
                      **efficiency(rows)}
        secs = sum(r["gen_seconds"] for r in rows)
        timing[w] = {"tokens_per_s": sum(r["tokens"] for r in rows) / secs if secs > 0 else None,
                     "generate_seconds": secs, "peak_memory_bytes": max(r["peak_memory"] for r in rows),
                     "kv_bytes_per_batch_max": max(r["kv_bytes"] for r in rows),
                     "kv_bytes_per_sequence": sum(r["kv_bytes"] / r["batch_size"] for r in rows) / len(rows)}
    return metrics, timing


def efficiency(rows):
    n = len(rows)
    return {"completions": n, "mean_tokens": sum(r["tokens"] for r in rows) / n,
            "evictions_per_completion": sum(r["evictions"] for r in rows) / n,
            "evicting_fraction": sum(r["evictions"] > 0 for r in rows) / n,
            "truncation_rate": sum(r["truncated"] for r in rows) / n,
            "no_answer_rate": sum(r["answer"] is None for r in rows) / n}


# -----------------------------------------------------------------------------------------------------------
# generation

def evaluate_window(model, tok, adapters, items, window, settings, out_file, batch_size):
    """Generate the pending `items` (dicts: key, benchmark, id, sample, ids, gold) at one window, batch by
    batch, appending each batch's sample lines to out_file as soon as it is done. Returns the new lines."""
    from tqdm import tqdm
    device = next(model.parameters()).device
    items = sorted(items, key=lambda it: (-len(it["ids"]), it["key"]))
    if batch_size is None:  # CUDA: as many as fit (the window keeps each small); CPU: 32
        slots = len(items[0]["ids"]) + min(window or settings["max_new_tokens"], settings["max_new_tokens"])
        batch_size = batch_that_fits(model, slots) or 32
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    new = []
    bar = tqdm(batches, desc=f"window {window_label(window)}", unit="batch", file=sys.stderr)
    for batch in bar:
        digest = hashlib.sha256("|".join([str(settings["seed"])]
                                         + [it["key"] for it in batch]).encode()).digest()
        gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "big") >> 1)
        reset_peak_memory(device)
        t0 = time.perf_counter()
        out = generate(model, [it["ids"] for it in batch], settings["max_new_tokens"], tok.stop_ids,
                       settings["temperature"], settings["top_p"], window, adapter=adapters, generator=gen,
                       pad_id=tok.pad_id)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt, peak = time.perf_counter() - t0, peak_memory(device)
        lines = []
        for i, it in enumerate(batch):
            n, trunc = int(out.lengths[i]), bool(out.truncated[i])
            text = tok.decode(out.tokens[i, :n].tolist())
            answer, correct = grade(text, it["gold"], trunc)  # lenient: evaluation grades any marker
            lines.append({"benchmark": it["benchmark"], "id": it["id"], "sample": it["sample"],
                          "window": "full" if window is None else window, "settings": settings["hash"],
                          "completion": text, "answer": answer, "gold": it["gold"], "correct": correct,
                          "tokens": n, "evictions": int(out.evictions[i]), "truncated": trunc,
                          "gen_seconds": dt / len(batch), "batch_size": len(batch), "kv_bytes": out.kv_bytes,
                          "peak_memory": peak})
        with open(out_file, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(ln, ensure_ascii=False) + "\n" for ln in lines))
            f.flush()
        new += lines
        bar.set_postfix(tok_s=f"{sum(ln['tokens'] for ln in lines) / dt:.1f}")
    return new


def read_samples(path):
    """Existing sample lines by key; a torn last line (an interrupted write) is skipped
    and newline-terminated."""
    done = {}
    if not path.exists():
        return done
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n")
    for line in text.splitlines():
        try:
            r = json.loads(line)
            done[sample_key(r["benchmark"], r["id"], r["sample"], r["window"], r["settings"])] = r
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def sample_key(benchmark, pid, sample, window, settings_hash):
    return f"{benchmark}|{pid}|{sample}|{window}|{settings_hash}"


# -----------------------------------------------------------------------------------------------------------
# output

def print_table(results):
    """Rows = windows (one method), columns = benchmarks + Avg, then the efficiency columns (as Table 1)."""
    cfg, met, tim = results["config"], results["metrics"], results["timing"]["per_window"]
    bench = cfg["benchmarks"]
    first = met[next(iter(met))]["benchmarks"]
    heads = [f"{b} {first[b]['headline']}" for b in bench]
    eff = ["peak MiB", "KV MiB/seq", "tok/s", "len", "evict/c", "trunc%", "noans%"]
    widths = [max(12, len(h) + 1) for h in heads]
    print(f"\nmethod {cfg['method']} | model {cfg['model']} | T {cfg['temperature']} top-p {cfg['top_p']} "
          f"({cfg['sampling_source']}) | max {cfg['max_new_tokens']} new tokens | "
          f"prompt {cfg['prompt_style']}")
    print(f"{'row':<16}" + "".join(f"{h:>{w}}" for h, w in zip(heads, widths)) + f"{'Avg':>7}" +
          "".join(f"{h:>11}" for h in eff))
    for w, m in met.items():
        t = tim[w]
        cells = [f"{100 * m['benchmarks'][b]['score']:>{wd}.1f}" for b, wd in zip(bench, widths)]
        tps = f"{t['tokens_per_s']:.1f}" if t["tokens_per_s"] else "-"
        vals = [f"{t['peak_memory_bytes'] / 2**20:.0f}", f"{t['kv_bytes_per_sequence'] / 2**20:.2f}", tps,
                f"{m['mean_tokens']:.0f}", f"{m['evictions_per_completion']:.2f}",
                f"{100 * m['truncation_rate']:.1f}", f"{100 * m['no_answer_rate']:.1f}"]
        print(f"{cfg['method'] + ' W=' + w:<16}" + "".join(cells) + f"{100 * m['avg']:>7.1f}" +
              "".join(f"{v:>11}" for v in vals))
    for note in results["notes"]:
        print(f"note: {note}")


def plot_sweep(results, path):
    """Accuracy (headline metric) versus window, one line per benchmark plus Avg: Figure 3's shape."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    met = results["metrics"]
    labels = list(met)
    x = list(range(len(labels)))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 0.0
    for b in results["config"]["benchmarks"]:
        ys = [100 * met[w]["benchmarks"][b]["score"] for w in labels]
        top = max(top, *ys)
        ax.plot(x, ys, marker="o", label=f"{b} ({met[labels[0]]['benchmarks'][b]['headline']})")
    ax.plot(x, [100 * met[w]["avg"] for w in labels], "k--", marker="s", label="Avg")
    ax.set_ylim(0, max(10.0, 1.1 * top))
    ax.set_xticks(x, labels)
    ax.set_xlabel("thought window W (tokens kept besides the prompt)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{results['config']['method']}: accuracy vs cache window "
                 f"({Path(results['config']['model']).name})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# -----------------------------------------------------------------------------------------------------------
# CLI

def parse_windows(spec):
    """'768,1024,full' -> [768, 1024, None] (sorted, no duplicates)."""
    out = []
    for part in str(spec).split(","):
        try:
            w = parse_window(part.strip())
        except ValueError as e:
            raise EvalError(str(e)) from None
        if w not in out:
            out.append(w)
    return sorted(out, key=lambda w: (w is None, w or 0))


def model_family(name, template):
    s, t = str(name).lower(), template or ""
    if "r1-distill" in s or "deepseek-r1" in s or "<｜Assistant｜>" in t:
        return "r1-distill"
    if "qwen" in s or "<|im_start|>" in t:
        return "qwen-instruct"
    return "unknown"


def check_args(a):
    for name, v, lo in (("--samples", a.samples, 1), ("--max-new-tokens", a.max_new_tokens, 1),
                        ("--limit", a.limit, 1), ("--batch-size", a.batch_size, 1)):
        if v is not None and v < lo:
            raise EvalError(f"{name} must be >= {lo} (got {v})")
    if a.temperature is not None and a.temperature < 0:
        raise EvalError(f"--temperature must be >= 0 (got {a.temperature})")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise EvalError(f"--top-p must be in (0, 1] (got {a.top_p})")
    if a.dtype is not None and a.dtype not in DTYPES:
        raise EvalError(f"unknown --dtype {a.dtype!r}; valid: {', '.join(sorted(DTYPES))}")
    if a.prompt_style is not None and a.prompt_style not in PROMPT_STYLES:
        raise EvalError(f"unknown --prompt-style {a.prompt_style!r}; "
                        f"valid styles: {', '.join(PROMPT_STYLES)}")


def newest_checkpoint(runs="runs"):
    """The most recently written ckpt-NNNNNN/ under `runs`
    (grpo.py writes runs/grpo/ckpt-NNNNNN by default)."""
    found = [p.parent for p in Path(runs).glob("**/ckpt-*/adapter.json") if not p.parent.name.startswith(".")]
    return max(found, key=lambda p: (p / "adapter.json").stat().st_mtime) if found else None


def choose_model(a):
    """Fill a.model / a.adapter when not given, so that `python grpo.py` then `python eval.py --window 768`
    works: the adapter's own base model; with neither, the newest checkpoint under runs/, else the default
    base model. Returns the adapter's adapter.json (None without adapters)."""
    if a.model is None and a.adapter is None:
        a.adapter = newest_checkpoint(a.runs)
        a.adapter = str(a.adapter) if a.adapter else None
        how = f"the newest checkpoint under {a.runs}/" if a.adapter else f"no checkpoint under {a.runs}/"
    else:
        how = "command line"
    meta = read_adapter_meta(a.adapter) if a.adapter else None
    if a.model is None:
        a.model = (meta or {}).get("base_model") or DEFAULT_MODEL
    print(f"evaluating {a.model}" + (f" with adapters {a.adapter}" if a.adapter else " (base model)") +
          f" ({how})")
    return meta


def print_plan(model, tok, adapters, items, windows, settings, batch_size):  # items: pending, all windows
    """What will run, and an estimate of how long from a short warm-up (one batch, 8 tokens): an upper bound
    on the work (every completion at --max-new-tokens), a lower bound on the speed
    (the warm-up's context is short)."""
    n, T = len(items), settings["max_new_tokens"]
    bench = ", ".join(f"{b} {sum(it['benchmark'] == b for it in items)}"
                      for b in dict.fromkeys(it["benchmark"] for it in items))
    line = f"plan: {n:,} completions to generate ({bench or 'all cached'}; {len(windows)} window(s)), " \
           f"at most {n * T:,} new tokens"
    if items:
        batch = [it["ids"] for it in items[:batch_size or 32]]
        g = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
        generate(model, batch[:1], 2, [], adapter=adapters, generator=g, pad_id=tok.pad_id)  # load kernels
        t0 = time.perf_counter()
        generate(model, batch, 8, [], window=windows[0], adapter=adapters, generator=g, pad_id=tok.pad_id)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        tok_s = 8 * len(batch) / (time.perf_counter() - t0)
        line += f"; warm-up {tok_s:,.0f} tok/s at batch {len(batch)} " \
                f"-> at most ~{n * T / tok_s / 3600:,.1f} h"
    print(line)


def resolve_settings(a, model, tok, meta, windows):
    """Everything that determines a sample (hashed into its key), plus the windows (those of --window, or
    None for the default) and how sampling was chosen."""
    method = meta["config"]["method"] if meta else "base"
    if windows is None:  # lora_c / pte: the window they were trained with (README choice 15)
        w = meta.get("window") if meta else None
        windows = [None] if method in ("base", "lora") else [w if isinstance(w, int) and w > 0 else 1024]
    family = model_family(a.model, tok.chat_template)
    T, P = FAMILY_SAMPLING[family]
    source = f"{family} default" if a.temperature is None and a.top_p is None else "command line"
    T = T if a.temperature is None else a.temperature
    P = P if a.top_p is None else a.top_p
    # README choice 14: the training template
    style = a.prompt_style or (meta or {}).get("prompt_style") or "dapo"
    if style not in PROMPT_STYLES:
        raise EvalError(f"adapter.json prompt_style {style!r} is not one of {', '.join(PROMPT_STYLES)}")
    sha = lambda b: hashlib.sha256(b).hexdigest()[:16]
    model_id = str(Path(a.model).resolve()) if Path(a.model).is_dir() else a.model  # ./m and /abs/m: one key
    settings = {"model": model_id, "model_fingerprint": fingerprint(model.cfg),
                "adapter_sha256": sha((Path(a.adapter) / "adapter.safetensors").read_bytes())
                                  if a.adapter else None,
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "chat_template_sha256": sha((tok.chat_template or "").encode()), "prompt_style": style,
                "temperature": T, "top_p": P, "max_new_tokens": a.max_new_tokens, "seed": a.seed}
    settings["hash"] = sha(json.dumps(settings, sort_keys=True).encode())
    return settings, windows, {"method": method, "family": family, "sampling_source": source}


def build_items(a, tok, data, style):
    """One item per (benchmark, problem, sample), with its prompt ids; the same items at every window."""
    items = []
    for b, probs in data.items():
        K = a.samples or DEFAULT_SAMPLES.get(b, 1)
        for p in probs:
            try:
                ids = encode_prompt(tok, p["problem"], style)
            except ValueError as e:
                raise EvalError(f"cannot build the prompt: {e}") from None
            items += [{"benchmark": b, "id": p["id"], "sample": s, "ids": ids, "gold": p["answer"]}
                      for s in range(K)]
    return items


def write_results(a, out, records, data, windows, settings, info, meta, items, timing_extra):
    """results.json (metrics from the sample lines only), the printed table and, for a sweep, the plot."""
    metrics, timing = summarize(records, list(data), windows)
    notes = [SIXTH_NOTE] if "minerva" in data else []
    if settings["temperature"] == 0 and max(it["sample"] for it in items) > 0:
        notes.append("greedy decoding (T 0): the samples of a problem are identical, pass@k = avg")
    results = {
        "config": {"model": a.model, "model_fingerprint": settings["model_fingerprint"], "adapter": a.adapter,
                   "adapter_sha256": settings["adapter_sha256"], "adapter_meta": meta,
                   "method": info["method"], "family": info["family"], "temperature": settings["temperature"],
                   "top_p": settings["top_p"], "sampling_source": info["sampling_source"],
                   "greedy": settings["temperature"] == 0,
                   "max_new_tokens": a.max_new_tokens, "windows": [window_label(w) for w in windows],
                   "benchmarks": list(data),
                   "samples": {b: a.samples or DEFAULT_SAMPLES.get(b, 1) for b in data},
                   "limit": a.limit, "prompt_style": settings["prompt_style"],
                   "chat_template_sha256": settings["chat_template_sha256"], "dtype": settings["dtype"],
                   "seed": a.seed, "settings_hash": settings["hash"], "batch_size": a.batch_size,
                   "eviction": "prompt pinned; oldest ceil(W/4) thought tokens evicted when W are held "
                               "(cache.py)"},
        "notes": notes,
        "metrics": metrics,
        "timing": {"per_window": timing, **timing_extra},
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    os.replace(tmp, out / "results.json")
    print_table(results)
    if len(windows) > 1:
        plot_sweep(results, out / "accuracy_vs_window.png")
        print(f"wrote {out / 'accuracy_vs_window.png'}")
    print(f"wrote {out / 'results.json'} and {out / 'samples.jsonl'}")


def run(a):
    t_start = time.time()
    check_args(a)
    meta = choose_model(a)
    windows = parse_windows(a.window) if a.window is not None else None  # fails before anything is loaded
    names = [b.strip() for b in a.benchmarks.split(",") if b.strip()]
    # DataError: bad name/file
    data = {b: load_benchmark(b, a.data_dir, a.limit) for b in dict.fromkeys(names)}
    model, tok = load_model(a.model, a.dtype, a.device)
    adapters = load_adapters(model, a.adapter) if a.adapter else None  # AdapterError: another base model
    settings, windows, info = resolve_settings(a, model, tok, meta, windows)
    default_out = Path("runs/eval") / (Path(a.model).name +
                                       (f"-{Path(a.adapter).resolve().name}" if a.adapter else ""))
    out = Path(a.out) if a.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    samples_path = out / "samples.jsonl"
    done = read_samples(samples_path)
    items = build_items(a, tok, data, settings["prompt_style"])
    print(f"model {a.model} | method {info['method']} | windows {', '.join(map(window_label, windows))} | "
          f"settings {settings['hash']} | out {out}")
    keyed = {w: [dict(it, key=sample_key(it["benchmark"], it["id"], it["sample"], window_label(w),
                                         settings["hash"])) for it in items] for w in windows}
    print_plan(model, tok, adapters, [it for w in windows for it in keyed[w] if it["key"] not in done],
               windows, settings, a.batch_size)
    records, generated = [], 0
    for w in windows:
        pending = [it for it in keyed[w] if it["key"] not in done]
        print(f"window {window_label(w)}: {len(pending)} to generate, {len(keyed[w]) - len(pending)} cached")
        if pending:
            for ln in evaluate_window(model, tok, adapters, pending, w, settings, samples_path, a.batch_size):
                done[sample_key(ln["benchmark"], ln["id"], ln["sample"], ln["window"], ln["settings"])] = ln
            generated += len(pending)
        records += [done[it["key"]] for it in keyed[w]]
    write_results(a, out, records, data, windows, settings, info, meta, items,
                  {"device": str(next(model.parameters()).device), "generated_this_run": generated,
                   "wall_seconds_this_run": time.time() - t_start})
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate a base model or PTE/LoRA adapters on math benchmarks.")
    ap.add_argument("--model", default=None, help="local HF folder or hub id (default: the adapter's base "
                    "model; with no --adapter either, the newest checkpoint under --runs, "
                    f"else {DEFAULT_MODEL})")
    ap.add_argument("--adapter", default=None, help="folder with adapter.json + adapter.safetensors (pte.py)")
    ap.add_argument("--runs", default="runs", help="where grpo.py writes "
                    "(searched when --model and --adapter are both absent)")
    ap.add_argument("--window", default=None, help="thought window W, 'full', or a list: "
                    "768,1024,2048,3072,full")
    ap.add_argument("--benchmarks", default=",".join(PAPER_BENCHMARKS),
                    help=f"comma list of {', '.join(BENCHMARKS)}")
    ap.add_argument("--samples", type=int, default=None, help="samples per problem for every benchmark")
    ap.add_argument("--max-new-tokens", type=int, default=3072)
    ap.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: by model family)")
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    ap.add_argument("--data-dir", default=None, help="offline JSONL copies (or env PTE_DATA_DIR); "
                    "default: the hub")
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per generate call (default: on "
                    "CUDA as many as half the free memory holds at the window; else 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-style", default=None, help=f"{' | '.join(PROMPT_STYLES)}")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float64 "
                    "(default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    try:
        return run(args)
    except (DataError, ModelError, AdapterError, EvalError) as e:
        msg = str(e).strip().splitlines()
        print(f"error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
