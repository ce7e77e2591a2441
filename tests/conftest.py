"""Shared test helpers: tiny random Qwen2 / Llama models saved as Hugging Face folders, and a byte-level
tokenizer with the chat specials, all built in code (tests never download)."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("PTE_SHARED", ROOT.parent / "shared"))

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
            "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
QWEN_TEMPLATE = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
                 "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
                 "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def shared_or_skip(*parts):
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not found: ../shared is absent (set PTE_SHARED to point at it)")
    return p


def make_tokenizer_json(path):
    """A byte-level BPE with no merges: 256 byte tokens + the chat specials. Encodes any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))
    return {s: tok.token_to_id(s) for s in SPECIALS}


def hf_config(kind="qwen2", **kw):
    from transformers import LlamaConfig, Qwen2Config
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    if kind == "qwen2":
        base.update(rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
        base.update(kw)
        return Qwen2Config(**base)
    base.update(rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    base.update(kw)
    return LlamaConfig(**base)


def make_hf_model(folder, kind="qwen2", seed=0, template=QWEN_TEMPLATE, max_shard_size=None, **kw):
    """Save a tiny random HF model + tokenizer to `folder`; returns the transformers model (fp32, eval)."""
    from transformers import AutoModelForCausalLM
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = make_tokenizer_json(folder / "tokenizer.json")
    cfg = hf_config(kind, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                    pad_token_id=ids["<|endoftext|>"], **kw)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random init has tiny std; widen it so logits differ meaningfully across tokens
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif p.dim() == 1 and p.shape[0] != cfg.hidden_size:
                p.normal_(0, 0.05)  # biases
    m.eval()
    kw_save = {"max_shard_size": max_shard_size} if max_shard_size else {}
    m.save_pretrained(folder, **kw_save)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": template, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids["<|im_end|>"],
                                                                                ids["<|endoftext|>"]]}))
    return m


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    make_hf_model(d, "qwen2")
    return d


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_hf_model(d, "llama")
    return d


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core CPU, 2-thread OpenMP under contention is 10x+ slower for tiny
    models."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
