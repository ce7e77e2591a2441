"""
model.py: a hand-written Qwen2 / Llama decoder that loads Hugging Face safetensors, and batched generation
under the paper's cache policy D (Section 3, Eq. 1: pi_theta^D(y|p) = prod_t pi_theta(y_t | C_t^D)).

    python model.py --model Qwen/Qwen2.5-0.5B-Instruct --prompt "What is 7*6?"              # full cache
    python model.py --model ./my-hf-folder --prompt "..." --window 256 --temperature 0.7    # sliding window

Module names match the HF checkpoints (model.layers.N.self_attn.q_proj, ...), so loading is one strict
load_state_dict with no renaming and no q/k permutation (HF weights use the rotate_half RoPE layout).
The cache (cache.py) is the only place that knows about eviction; PTE hooks in through an `adapter` object
(pte.py) that generate() tells about every eviction event.
"""
import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cache import KVCache, eviction_steps, parse_window


class ModelError(ValueError):
    """Bad model input (missing folder, corrupt file, unsupported config). The message is one line."""


# the paper's main model: grpo.py trains it, eval.py falls back to it
DEFAULT_MODEL = "Qwen/Qwen2.5-3B-Instruct"

# what --dtype accepts everywhere (float64: exactness tests and debugging on CPU)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def logprob_dtype(dtype):
    """Log-probs are computed in fp32 at least (fp64 for an fp64 model, so exactness tests keep their
    digits)."""
    return torch.promote_types(dtype, torch.float32)


# -----------------------------------------------------------------------------------------------------------
# config

@dataclass
class ModelConfig:
    arch: str                 # "qwen2" | "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # llama3 parameters, or None
    attention_bias: bool       # q/k/v bias (Qwen2: always; Llama: attention_bias)
    tie_word_embeddings: bool
    eos_token_ids: tuple = ()

    @staticmethod
    def from_hf(c: dict) -> "ModelConfig":
        archs = c.get("architectures") or [c.get("model_type", "?")]
        arch = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}.get(archs[0])
        if arch is None:
            raise ModelError(f"architectures={archs[0]!r} is not supported "
                             "(Qwen2ForCausalLM, LlamaForCausalLM)")
        for key in ("num_local_experts", "num_experts"):
            if c.get(key):
                raise ModelError(f"{key}={c[key]}: mixture-of-experts models are not supported")
        if c.get("use_sliding_window"):
            raise ModelError("use_sliding_window=true is not supported (Qwen2's per-layer sliding window)")
        # transformers 5 moved rope_theta/rope_scaling into rope_parameters; hub files still have the old keys
        rp = dict(c.get("rope_parameters") or {})
        rs = c.get("rope_scaling") or {}
        rope_type = rs.get("rope_type", rs.get("type")) or rp.get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise ModelError(f"rope_type={rope_type!r} is not supported (default, llama3)")
        scaling = None
        if rope_type == "llama3":
            src = rs if rs.get("rope_type", rs.get("type")) == "llama3" else rp
            scaling = {k: float(src[k]) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                  "original_max_position_embeddings")}
        if float(c.get("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0))) != 1.0:
            raise ModelError("partial_rotary_factor != 1 is not supported")
        eos = c.get("eos_token_id")
        n_heads = c["num_attention_heads"]
        return ModelConfig(
            arch=arch, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], n_layers=c["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=c.get("num_key_value_heads") or n_heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(c.get("rope_theta", rp.get("rope_theta", 10000.0))), rope_scaling=scaling,
            attention_bias=True if arch == "qwen2" else bool(c.get("attention_bias", False)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),  # transformers default
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]))


# -----------------------------------------------------------------------------------------------------------
# layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype  # normalise in fp32 whatever the dtype (fp64 too), exactly as transformers does
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies in fp32, with Llama-3 per-frequency rescaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_scaling is None:
        return inv_freq
    s = cfg.rope_scaling
    factor, lo, hi, old = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                           s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (> old/lo) are slowed by `factor`, short ones (< old/hi) kept, the band between blended
    scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq, pos, dtype):
    """pos (B, T) absolute positions -> cos, sin (B, 1, T, head_dim) in the HF half-split layout."""
    freqs = pos[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # x*cos + rotate_half(x)*sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)   # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, n_used, hd): prompt + window (+ this chunk)
        # an explicit mask whenever a cache is involved: SDPA's is_causal is top-left aligned when T < S
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.nkv != self.nh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):  # the HF "model." prefix
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, idx, cache: KVCache | None = None, pos=None, mask=None, hidden_only=False):
        """idx (B, T) token ids -> logits (B, T, vocab) (or final hidden states (B, T, d) if hidden_only).
        With a cache, positions and the mask come from it; without, pos defaults to 0..T-1 and mask to
        causal."""
        B, T = idx.shape
        if cache is not None and pos is None:  # the static decode step passes its own pos and mask
            pos, mask = cache.prepare(T)
        elif pos is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
        x = self.model.embed_tokens(idx)
        cos, sin = rope_cos_sin(self.inv_freq, pos, x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, mask, cache)
        x = self.model.norm(x)
        return x if hidden_only else self.lm_head(x)

    def new_cache(self, prompt_lens, max_new_tokens, window=None) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.cfg.n_layers, prompt_lens, self.cfg.n_kv_heads, self.cfg.head_dim, max_new_tokens,
                       window, dtype=p.dtype, device=p.device)


# -----------------------------------------------------------------------------------------------------------
# loading

def resolve_model_dir(name_or_path: str) -> Path:
    """A local folder, or a hub id fetched with huggingface_hub (honours its cache and HF_HUB_OFFLINE)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1 or p.exists()
    if looks_local:
        raise ModelError(f"model folder not found: {name_or_path}")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.jinja",
                                                                    "tokenizer*"]))
    except Exception as e:  # offline, unknown repo, gated repo...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"no local folder {name_or_path!r} "
                         f"and it cannot be fetched from the hub: {msg}") from None


def read_json(path: Path, error=ModelError) -> dict:
    """A JSON file (config.json, adapter.json...), or `error` (the caller's one-line error type) naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"missing {path.name} in {path.parent}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: {e}") from None


def load_state(folder: Path, dtype) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    index = folder / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
    sd = {}
    for f in files:
        if not (folder / f).exists():
            raise ModelError(f"missing weights file {folder / f}")
        try:
            part = load_file(folder / f)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelError(f"cannot read {folder / f} (truncated or corrupt?): "
                             f"{str(e).splitlines()[0]}") from None
        for k in list(part):  # convert one tensor at a time: never a second full copy of the weights
            sd[k] = part.pop(k).to(dtype)
    return sd


def from_state_dict(cfg: ModelConfig, sd: dict, device) -> Transformer:
    """A frozen Transformer in eval mode that holds the tensors of `sd` (HF names; strict; no copy where the
    device matches, so bench.py can run ours and a transformers model on the very same weights)."""
    device = torch.device(device)
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints carry this
    if cfg.tie_word_embeddings and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
    model = model.to(device).eval().requires_grad_(False)
    return column_major_linears(model) if device.type == "cpu" else model


def column_major_linears(model: Transformer) -> Transformer:
    """Store every linear weight (out, in) column-major, i.e. as a contiguous W^T: F.linear then runs the
    plain x @ W^T GEMM (no transposed operand), which for decode's few rows is much faster on CPU (MKL) than
    the transposed-B GEMM that row-major weights get. Same values, shapes, names and autograd: only the
    strides."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.weight = nn.Parameter(mod.weight.t().contiguous().t(), requires_grad=False)
    if model.cfg.tie_word_embeddings:  # lm_head got a new tensor: the embedding follows it
        model.model.embed_tokens.weight = model.lm_head.weight
    return model


def load_model(name_or_path: str, dtype=None, device=None):
    """-> (Transformer in eval mode, Tokenizer). dtype defaults to bf16 on CUDA and fp32 on CPU."""
    from tokenizer import Tokenizer, TokenizerError
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    folder = resolve_model_dir(name_or_path)
    cfg = ModelConfig.from_hf(read_json(folder / "config.json"))
    sd = load_state(folder, dtype)
    try:
        model = from_state_dict(cfg, sd, device)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ModelError(f"weights do not match config.json in {folder}: "
                         f"{' '.join(lines[1:3])[:300]}") from None
    model.name_or_path = name_or_path
    try:
        tok = Tokenizer(folder, extra_eos=cfg.eos_token_ids)
    except TokenizerError as e:
        raise ModelError(str(e)) from None
    return model, tok


# -----------------------------------------------------------------------------------------------------------
# generation

@dataclass
class Generation:
    tokens: torch.Tensor     # (B, T) completion ids, pad after the stop token
    lengths: torch.Tensor    # (B,) tokens up to and including the stop token
    logprobs: torch.Tensor   # (B, T) log pi(y_t) under the temperature-scaled policy (what GRPO replays)
    truncated: torch.Tensor  # (B,) no stop token within max_new_tokens
    evictions: torch.Tensor  # (B,) eviction events that happened while the sequence was still generating
    kv_bytes: int            # bytes held by the KV cache (constant in window mode)


def sample(logits, temperature, top_p, generator=None):
    """logits (B, V) -> token (B,), log-prob (B,) under softmax(logits / T). Greedy when T == 0.
    The recorded log-prob ignores top-p truncation (as verl does): replay recomputes exactly this quantity."""
    logits = logits.to(logprob_dtype(logits.dtype))
    if temperature == 0:
        tok = logits.argmax(-1)  # log pi(tok) = logit - logsumexp: no (B, V) log-softmax tensor
        return tok, logits.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(logits, -1)
    logp = torch.log_softmax(logits / temperature, -1)
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    # Gumbel-style draw with exponential noise: no host sync (unlike torch.multinomial on CUDA)
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    tok = (probs / q).argmax(-1)
    return tok, logp.gather(-1, tok[:, None])[:, 0]


def left_pad(prompts, pad_id, device):
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
    return idx.to(device), [len(p) for p in prompts]


# static decode, full mode: attend over the used slots rounded up to this (one graph per bucket)
FULL_BUCKET = 256
STOP_EVERY = 16    # static decode: the host checks "every sequence stopped" (a sync) once per this many steps


@torch.no_grad()
def generate(model, prompts, max_new_tokens, stop_ids, temperature=0.0, top_p=1.0, window=None, adapter=None,
             generator=None, pad_id=0, on_token=None, static=None, cuda_graph=True) -> Generation:
    """Batched decode under cache policy D. prompts: list of token-id lists (any lengths; left-padded).
    window=None: full cache; window=W: W thought slots, evicting the oldest ceil(W/4) when full.
    adapter (pte.py): reset(B) before prefill, fold(K_e, V_e) at each eviction event (PTE's Eq. 4/6).
    on_token(tok (B,)): called with every sampled token (the CLI streams with it).
    static: the decode step with static shapes (decode_one_token), default on CUDA; otherwise the dynamic
    step, which attends over the used prefix of the cache only (faster eagerly, the default on CPU). Same
    tokens and log-probs either way (tests/test_static.py). cuda_graph=False runs the static step eagerly
    (debugging)."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (got {temperature})")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (got {top_p})")
    device = next(model.parameters()).device
    idx, plens = left_pad(prompts, pad_id, device)
    B = len(prompts)
    cache = model.new_cache(plens, max_new_tokens, window)
    if adapter is not None:
        adapter.reset(B)
    if static is None:
        static = device.type == "cuda"
    if static:
        return generate_static(model, idx, cache, max_new_tokens, stop_ids, temperature, top_p, window,
                               adapter, generator, pad_id, on_token, cuda_graph and device.type == "cuda")
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, dtype=logprob_dtype(next(model.parameters()).dtype),
                           device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # prefill (pinned region); last logits only
    logits = model.lm_head(model(idx, cache, hidden_only=True)[:, -1])
    for t in range(max_new_tokens):
        tok, lp = sample(logits, temperature, top_p, generator)
        tok = torch.where(done, pad_id, tok)
        tokens[:, t], logprobs[:, t] = tok, torch.where(done, 0.0, lp)
        if on_token is not None:
            on_token(tok)
        newly = ~done & torch.isin(tok, stop)
        lengths = torch.where(newly, t + 1, lengths)
        done = done | newly
        if t == max_new_tokens - 1 or bool(done.all()):  # the one host sync per token: the stop check
            break
        if cache.needs_evict():  # policy D: make room before the next thought token is appended
            K_e, V_e, pos_e = cache.evict()
            if adapter is not None:
                adapter.fold(K_e, V_e, pos_e)
        logits = model(tok[:, None], cache)[:, -1]
    return Generation(tokens, lengths, logprobs, ~done, evictions_before_end(window, max_new_tokens, lengths),
                      cache.nbytes())


def evictions_before_end(window, max_new_tokens, lengths):
    ev = torch.tensor(eviction_steps(window, max_new_tokens), dtype=torch.long, device=lengths.device)
    return (ev[None, :] <= lengths[:, None] - 2).sum(-1)  # events before the last token that mattered


# -----------------------------------------------------------------------------------------------------------
# static decode: one step with fixed shapes, replayed as a CUDA graph (the decode_one_token / decode_n_tokens
# split of gpt-fast). On an H100 a 3B model's eager step costs ~27 ms at batch 1 and 64 alike (Python and
# kernel launches), the same step as one CUDA graph ~5 ms.

@dataclass
class DecodeState:
    """Everything the static step reads and writes, in buffers allocated once per generate() call."""
    tok: torch.Tensor       # (B,) the last sampled token: the one fed next
    i: torch.Tensor         # (1,) its index in the completion = its thought index (a device counter)
    tokens: torch.Tensor    # (B, N) as in Generation
    logprobs: torch.Tensor  # (B, N)
    lengths: torch.Tensor   # (B,)
    done: torch.Tensor      # (B,) stop token sampled
    stop: torch.Tensor      # (n_stop,) stop ids


def record(st: DecodeState, tok, lp, pad_id):
    """Store token st.i (forced to pad once a sequence has stopped) and update the stop state, on the
    device."""
    tok = torch.where(st.done, pad_id, tok)
    st.tokens.index_copy_(1, st.i, tok[:, None])
    st.logprobs.index_copy_(1, st.i, torch.where(st.done, 0.0, lp).to(st.logprobs.dtype)[:, None])
    newly = ~st.done & (tok[:, None] == st.stop).any(-1)  # torch.isin without its data-dependent paths
    st.lengths.copy_(torch.where(newly, st.i + 1, st.lengths))
    st.done.logical_or_(newly)
    st.tok.copy_(tok)


def decode_one_token(model, cache, st: DecodeState, n_attend, temperature, top_p, generator, pad_id):
    """Feed token st.i, sample token st.i + 1 and record it. Fixed shapes, no host sync, no Python number that
    changes per step: capturable as one CUDA graph per (batch, n_attend)."""
    pos, mask = cache.prepare_static(st.i, n_attend)
    logits = model(st.tok[:, None], cache, pos=pos, mask=mask)[:, -1]
    st.i.add_(1)
    tok, lp = sample(logits, temperature, top_p, generator)
    record(st, tok, lp, pad_id)


class GraphedStep:
    """decode_one_token as CUDA graphs, one per attended length: window mode one (all P + W slots), full mode
    one per FULL_BUCKET. The first step at a new length runs eagerly on a side stream (it warms up cuBLAS and
    lazily initialised kernels, which must not happen during capture) and is then captured; later steps
    replay.

    Why torch.cuda.CUDAGraph and not torch.compile(mode="reduce-overhead"): the step samples with the caller's
    torch.Generator, which a graph takes as a registered generator state (register_generator_state: each
    replay advances its Philox offset exactly as the eager step would), while dynamo does not trace Generator
    arguments; the step also mutates the cache, the adapters' S and the outputs in place, which cudagraph
    trees copy or refuse; and compiling a 36-layer model takes minutes per shape. Eager code stays the code
    that runs, and the graph is captured per generate() call (the buffers it reads are that call's), a cost of
    about one eager step per shape."""
    def __init__(self, step, generator):
        self.step, self.generator, self.graphs, self.pool = step, generator, {}, None

    def __call__(self, n_attend):
        g = self.graphs.get(n_attend)
        if g is not None:
            g.replay()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step(n_attend)  # this step's real work, eagerly
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        if self.generator is not None:  # the default generator is registered by capture itself
            g.register_generator_state(self.generator)
        with torch.cuda.graph(g, pool=self.pool):  # records the next steps' work; runs nothing
            self.step(n_attend)
        # buckets replay in capture order, never concurrently: one memory pool
        self.pool = self.pool or g.pool()
        self.graphs[n_attend] = g


def generate_static(model, idx, cache, N, stop_ids, temperature, top_p, window, adapter, generator, pad_id,
                    on_token, cuda_graph):
    """generate()'s decode loop with the static step (decode_n_tokens). Eviction and PTE's fold stay outside
    the step, on the host (once per ceil(W/4) steps; the schedule depends only on the token count), writing
    into the buffers the step reads (the cache in place; Adapters copies S into fixed buffers under
    no_grad)."""
    B, device = idx.shape[0], idx.device
    st = DecodeState(tok=torch.zeros(B, dtype=torch.long, device=device),
                     i=torch.zeros(1, dtype=torch.long, device=device),
                     tokens=torch.full((B, N), pad_id, dtype=torch.long, device=device),
                     logprobs=torch.zeros(B, N, device=device,
                                          dtype=logprob_dtype(next(model.parameters()).dtype)),
                     lengths=torch.full((B,), N, dtype=torch.long, device=device),
                     done=torch.zeros(B, dtype=torch.bool, device=device),
                     stop=torch.tensor(sorted(stop_ids), dtype=torch.long, device=device))
    logits = model.lm_head(model(idx, cache, hidden_only=True)[:, -1])  # prefill (dynamic shapes, eager)
    record(st, *sample(logits, temperature, top_p, generator), pad_id)  # token 0
    if on_token is not None:
        on_token(st.tokens[:, 0])

    def step(n_attend):
        decode_one_token(model, cache, st, n_attend, temperature, top_p, generator, pad_id)

    run = GraphedStep(step, generator) if cuda_graph else step
    n_slots = cache.k.shape[3]
    # tokens after a sequence's stop are forced to pad, so checking less often changes no output; a streaming
    # caller (on_token) syncs every step anyway
    check = 1 if on_token is not None else STOP_EVERY
    for t in range(N - 1):  # t: index of the last sampled token, fed now
        if t % check == 0 and bool(st.done.all()):
            break
        if cache.needs_evict():  # policy D, outside the graph: evict, then fold into the adapters' S buffers
            K_e, V_e, pos_e = cache.evict()
            if adapter is not None:
                adapter.fold(K_e, V_e, pos_e)
        cache.advance(1)
        run(n_slots if window is not None else min(n_slots, -(-cache.n_fed // FULL_BUCKET) * FULL_BUCKET))
        if on_token is not None:
            on_token(st.tokens[:, t + 1])
    return Generation(st.tokens, st.lengths, st.logprobs, ~st.done,
                      evictions_before_end(window, N, st.lengths), cache.nbytes())


def batch_that_fits(model, slots, frac=0.5):
    """Sequences per generate() call on CUDA: as many as `frac` of the free memory holds, each with a KV cache
    of `slots` slots (prompt + window, or + max new tokens with the full cache) plus the sampling's fp32
    logits. None on CPU (no such limit to size from): callers keep their own default."""
    p = next(model.parameters())
    if p.device.type != "cuda":
        return None
    c = model.cfg
    per = 2 * c.n_layers * c.n_kv_heads * c.head_dim * slots * p.element_size() + 3 * 4 * c.vocab_size
    return max(1, int(frac * torch.cuda.mem_get_info(p.device)[0] // per))


def reset_peak_memory(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> int:
    """Peak bytes: CUDA, the allocator's peak since reset_peak_memory; CPU, the process's peak resident set
    (model included, never reset). bench.peak_tensor_memory counts the tensors of one call exactly instead."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024


# -----------------------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description="Chat with a Qwen2/Llama model "
                                             "under a full or sliding-window cache.")
    ap.add_argument("--model", required=True, help="local HF folder or hub id")
    ap.add_argument("--prompt", required=True, help="user message (the model's chat template is applied)")
    ap.add_argument("--system", default=None, help="optional system message")
    ap.add_argument("--window", default="full", help="thought-window W (int) or 'full'")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                    help="float32 | bfloat16 | float64 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cuda-graph", action="store_true",
                    help="CUDA: run the static decode step eagerly instead of replaying it as a CUDA graph "
                         "(debugging)")
    args = ap.parse_args(argv)
    try:
        window = parse_window(args.window)
        if args.max_new_tokens < 1:
            raise ModelError("--max-new-tokens must be >= 1")
        if not args.temperature >= 0:
            raise ModelError(f"--temperature must be >= 0 (0 = greedy; got {args.temperature})")
        if not 0 < args.top_p <= 1:
            raise ModelError(f"--top-p must be in (0, 1] (got {args.top_p})")
        model, tok = load_model(args.model, args.dtype, args.device)
    except ValueError as e:  # ModelError, and a bad --window
        print(f"error: {e}", file=sys.stderr)
        return 2
    msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
           [{"role": "user", "content": args.prompt}]
    ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    reply, shown = [], ""

    def stream(t):  # decode the whole reply so far: a multi-byte character prints once it is complete
        nonlocal shown
        reply.append(int(t[0]))
        text = tok.decode(reply)
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text

    out = generate(model, [ids], args.max_new_tokens, tok.stop_ids, args.temperature, args.top_p, window,
                   generator=g, pad_id=tok.pad_id, on_token=stream, cuda_graph=not args.no_cuda_graph)
    n = int(out.lengths[0])
    print(tok.decode(out.tokens[0, :n].tolist())[len(shown):])
    print(f"[{n} tokens, {int(out.evictions[0])} eviction events, KV cache {out.kv_bytes / 2**20:.1f} MiB]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
