"""GRPO (grpo.py): advantages, ratio 1 at the first update for every method, GRPO learns a toy task (lora,
lora_c, pte under a window smaller than the completion), exact resume, torchrun == one process,
bad input -> one line.

The toy task: reward 1 if the completion contains one of the characters "abc" (grpo.toy_reward); a random
model hits it ~10% of the time. The toy model is a 1-layer, 32-wide Qwen2 whose final RMSNorm gain is 3: a
random tiny model's logits are nearly flat and bounded (|h| |e|), so no adapter could make a token likely; the
gain gives the logits the range a trained model has. Everything runs with one CPU thread
(tiny matmuls; 2-core CI boxes)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grpo
from model import load_model
from pte import Adapters

ROOT = Path(__file__).resolve().parents[1]
TOY_ARGS = ["--reward", "toy", "--prompt-style", "boxed", "--group-size", "4", "--prompts-per-step", "4",
            "--micro-batch", "8", "--max-new-tokens", "12", "--window", "4", "--rank", "4",
            "--global-tokens", "4", "--lr", "3e-2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from conftest import make_hf_model
    d = tmp_path_factory.mktemp("toy")
    make_hf_model(d, "qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1)
    sd = load_file(d / "model.safetensors")
    sd["model.norm.weight"] *= 3.0
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    path.write_text("".join(json.dumps({"problem": f"question {i}", "answer": "abcdefgh"}) + "\n"
                            for i in range(8)))
    return path


def setup(model_dir, **kw):
    kw = dict(dict(group_size=8, prompts_per_step=4, micro_batch=32, max_new_tokens=12, rank=4,
                   global_tokens=4, lr=3e-2, prompt_style="boxed"), **kw)
    cfg = grpo.GRPOConfig(model=str(model_dir), **kw)
    grpo.validate(cfg, 1)
    model, tok = load_model(cfg.model, cfg.dtype)
    torch.manual_seed(0)
    adapters = Adapters(model, grpo.adapter_config(cfg))
    return cfg, model, tok, adapters, grpo.make_optimizer(adapters, cfg)


def test_advantages_worked_example():
    r = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    A, zero = grpo.advantages(r, "population")
    assert torch.allclose(A[0], torch.tensor([1.7320508, -0.5773503, -0.5773503, -0.5773503]), atol=1e-5)
    assert zero.tolist() == [False, True, True, False] and A[1:3].abs().max() == 0
    assert torch.allclose(A[3], torch.tensor([1.0, -1, 1, -1]), atol=1e-5)
    A, _ = grpo.advantages(r, "unbiased")
    assert torch.allclose(A[0], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5)
    A, _ = grpo.advantages(r, "none")
    assert torch.allclose(A[0], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_score_math_reward_and_no_answer():
    """score() with --reward math under --prompt-style boxed: a correct \\boxed{} answer gets 1 and is
    answered, a completion without one gets 0 and is no_answer. A plain-float reward counts as answered."""
    texts = ["2 + 2 = 4, so the answer is \\boxed{4}.", "I am not sure."]

    class Tok:
        def decode(self, ids):
            return texts[ids[0]]
    mb = grpo.MicroBatch(prompts=[[0], [0]], golds=["4", "4"], window=None, seed=0,
                         tokens=torch.tensor([[0], [1]]), lengths=torch.tensor([1, 1]),
                         old_logp=torch.zeros(2, 1), truncated=torch.tensor([False, False]),
                         evictions=torch.zeros(2, dtype=torch.long))
    reward_fn = grpo.reward_for(grpo.GRPOConfig(reward="math", prompt_style="boxed"))
    got, rewards, no_answer = grpo.score([mb], Tok(), reward_fn)
    assert got == texts and rewards.tolist() == [1.0, 0.0] and no_answer.tolist() == [False, True]
    _, rewards, no_answer = grpo.score([mb], Tok(), grpo.toy_reward)
    assert rewards.tolist() == [1.0, 0.0] and no_answer.tolist() == [False, False]


# max |ratio - 1| at the first update, measured (1 or 2 threads, torch 2.13 CPU): float64, 0 for lora and
# lora_c; pte 0 under the boxed prompt and 3.5e-9 under the longer DAPO prompt (P = 299: one element of 768
# differs, the rest is bit-identical; a kernel picked by shape, not explained further).
# fp32: 2.4e-6 (pte), 9.5e-7 (lora, lora_c). Tolerances ~300x / ~40x those; a real defect
# (a wrong schedule, a stale S) moves log-probs by > 1e-2.
RATIO_TOL = {"float64": 1e-6, "float32": 1e-4}


@pytest.mark.parametrize("method,window,dtype,micro", [("lora", None, "float64", 32),
                                                       ("lora_c", 6, "float64", 32),
                                                       ("pte", 6, "float64", 32), ("pte", 6, "float32", 32),
                                                       ("pte", 6, "float64", 5),
                                                       ("lora_c", 6, "float32", 5)])
def test_first_update_ratio_is_one(qwen_dir, method, window, dtype, micro):
    """Random non-zero adapters, a window smaller than the completion: at the first update the replayed
    log-probs equal the rollout's, so every ratio is 1 and nothing is clipped; the adapters get a gradient.
    micro 5: the 32 responses are sampled by one generate() call (--rollout-batch 32) and replayed in
    micro-batches of 5 (groups of 8 split across them), each with the rollout batch's window."""
    cfg, model, tok, ad, opt = setup(qwen_dir, method=method, window=window, max_new_tokens=24, dtype=dtype,
                                     rollout_batch=32, micro_batch=micro)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    problems = [{"problem": f"p{i}", "answer": "x"} for i in range(4)]
    m = grpo.grpo_step(model, ad, opt, tok, problems, cfg, step=1,
                       reward_fn=lambda text, gold, truncated: float(len(text) % 2))
    assert m["updated"] and m["tokens"] > 100
    assert m["ratio_dev0"] <= RATIO_TOL[dtype] and m["clip_frac"] == 0.0
    assert m["grad_norm"] > 0
    if window:
        assert min(m["evictions"]) >= 2
    assert len(m["seeds"]) == 1 and m["skipped_mb"] == 0  # one rollout batch, every micro-batch replayed


@pytest.mark.parametrize("method,window", [("lora", None), ("lora_c", 4), ("pte", 4)])
def test_grpo_learns_toy_task(toy_dir, method, window):
    """grpo.py's own loop (rollout -> score -> advantages -> replay/loss/step) with an injected reward: the
    mean reward goes from ~0.1 to >= 0.8 within 25 steps (window 4 < 12 new tokens for lora_c and pte)."""
    cfg, model, tok, ad, opt = setup(toy_dir, method=method, window=window)
    problems = [{"problem": f"q{i}", "answer": "abc"} for i in range(4)]
    rewards = []
    for step in range(1, 26):
        m = grpo.grpo_step(model, ad, opt, tok, problems, cfg, step, reward_fn=grpo.toy_reward)
        rewards.append(sum(m["rewards"]) / len(m["rewards"]))
        if step > 3 and min(rewards[-3:]) >= 0.8:
            break
    assert sum(rewards[:3]) / 3 < 0.25, rewards
    assert min(rewards[-3:]) >= 0.8, rewards
    if window:
        assert max(m["evictions"]) >= 1


def test_kl_is_zero_for_fresh_adapters(toy_dir):
    cfg, model, tok, ad, opt = setup(toy_dir, method="pte", window=4, kl=0.1)
    problems = [{"problem": f"q{i}", "answer": "abc"} for i in range(4)]
    m = grpo.grpo_step(model, ad, opt, tok, problems, cfg, 1, reward_fn=grpo.toy_reward)
    assert abs(m["kl"]) < 1e-6  # A = 0 at init: the policy is the frozen base
    m = grpo.grpo_step(model, ad, opt, tok, problems, cfg, 2, reward_fn=grpo.toy_reward)
    assert m["kl"] > 1e-4


def run_main(argv):
    assert grpo.main([str(a) for a in argv]) == 0


def test_resume_is_bit_identical(toy_dir, toy_data, tmp_path):
    common = ["--model", toy_dir, "--train-data", toy_data, *TOY_ARGS, "--method", "pte", "--save-every", "2"]
    run_main([*common, "--steps", "4", "--out", tmp_path / "a"])
    run_main([*common, "--steps", "3", "--out", tmp_path / "b"])
    shutil.rmtree(tmp_path / "b" / "ckpt-000003")  # "killed" during step 3, after ckpt-2
    run_main([*common, "--steps", "4", "--out", tmp_path / "b", "--resume"])
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / r / "ckpt-000004" / "adapter.safetensors") for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if k.endswith(".A"))  # LoRA A starts at 0: training happened
    sa, sb = (torch.load(tmp_path / r / "ckpt-000004" / "trainer.pt", weights_only=True) for r in "ab")
    assert sa["data_pos"] == sb["data_pos"] == 16
    for k, v in sa["optimizer"]["state"].items():
        assert all(torch.equal(v[n], sb["optimizer"]["state"][k][n]) for n in v)
    la, lb = ([json.loads(x) for x in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in "ab")
    assert [x["step"] for x in lb] == [1, 2, 3, 4]  # the redone step 3 replaced the first one
    same = ("reward", "reward_std", "len", "entropy", "loss", "grad_norm", "clip_frac", "seeds", "samples")
    assert [[x[k] for k in same] for x in la] == [[x[k] for k in same] for x in lb]
    meta = json.loads((tmp_path / "a" / "ckpt-000004" / "adapter.json").read_text())
    assert meta["config"]["method"] == "pte" and meta["window"] == 4 and meta["prompt_style"] == "boxed"
    assert meta["chat_template"]
    assert (tmp_path / "a" / "curves.png").stat().st_size > 0  # training curves beside the checkpoints
    run_main(["--plot", tmp_path / "a", tmp_path / "b"])
    assert (tmp_path / "curves.png").stat().st_size > 0


def env1():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


def test_torchrun_matches_one_process(toy_dir, toy_data, tmp_path):
    """2 processes (gloo), 2 prompts each, == 1 process with the same 4 prompts per step. The two runs sum the
    gradient in different orders, and AdamW amplifies a rounding difference in a gradient element that nearly
    cancels by up to lr / eps = 3e-2 / 1e-8 = 3e6. So the test runs in float64, where the worst difference
    measured was 4.7e-9; 1e-6 leaves ~200x headroom, and a real defect (a rank's share dropped or counted
    twice, a missing all-reduce) moves a parameter by ~lr = 3e-2."""
    args = ["--model", toy_dir, "--train-data", toy_data, *TOY_ARGS, "--steps", "2", "--dtype", "float64"]
    run_main([*args, "--out", tmp_path / "one"])
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "grpo.py", *map(str, args),
                          "--out", str(tmp_path / "two")],
                         cwd=ROOT, env=env1(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / r / "ckpt-000002" / "adapter.safetensors") for r in ("one", "two"))
    assert any(a[k].abs().max() > 0 for k in a if k.endswith(".A"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |one process - torchrun| over the adapters: {diff:.1e}")
    assert diff < 1e-6
    la, lb = ([json.loads(x) for x in (tmp_path / r / "log.jsonl").read_text().splitlines()]
              for r in ("one", "two"))
    assert [x["reward"] for x in la] == [x["reward"] for x in lb] and any(x["updated"] for x in la)
    assert [x["seeds"] for x in la] == [x["seeds"] for x in lb]


def test_bad_input_is_one_line(toy_dir, toy_data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2", "answer": \n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    noans = tmp_path / "noans.jsonl"
    noans.write_text('{"problem": "1+1", "solution": "2"}\n')
    # a run with checkpoints at steps 1 and 2; then break the latest one in two ways
    base = ["--model", toy_dir, "--train-data", toy_data, *TOY_ARGS, "--steps", "2", "--save-every", "1"]
    run_main([*base, "--out", tmp_path / "run"])
    shutil.copytree(tmp_path / "run", tmp_path / "run2")
    (tmp_path / "run" / "ckpt-000002" / "trainer.pt").write_bytes(b"not a checkpoint")
    st = tmp_path / "run2" / "ckpt-000002" / "adapter.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    model = ["--model", toy_dir]
    # in a subprocess: the process exit path, and hub look-ups
    # (HF_HUB_OFFLINE is read when huggingface_hub loads)
    spawned = {
        "malformed": ([*model, "--train-data", bad], "bad.jsonl:2"),
        "hub model": (["--model", "no-such-org/no-such-model", "--train-data", toy_data],
                      "no-such-org/no-such-model"),
        "hub data": ([*model, "--train-data", "no-such-org/no-such-data"], "no-such-org/no-such-data"),
    }
    # in this process, through the same main(): what it prints to stderr and returns
    direct = {
        "empty": ([*model, "--train-data", empty], "no records"),
        "no answer": ([*model, "--train-data", noans], "'answer'"),
        "window 0": ([*model, "--train-data", toy_data, "--window", "0"], "--window"),
        "window -3": ([*model, "--train-data", toy_data, "--window", "-3"], "--window"),
        "split group": ([*model, "--train-data", toy_data, "--group-size", "4", "--rollout-batch", "6"],
                        "--rollout-batch"),
        "corrupt trainer.pt": ([*base, "--steps", "3", "--out", tmp_path / "run", "--resume"], "ckpt-000001"),
        "corrupt adapter": ([*base, "--steps", "3", "--out", tmp_path / "run2", "--resume"], "ckpt-000001"),
        "no resume": ([*base, "--out", tmp_path / "run"], "--resume"),
    }
    procs = {k: subprocess.Popen([sys.executable, "grpo.py", *map(str, argv)], cwd=ROOT, env=env1(),
                                 text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k, (argv, _) in spawned.items()}
    results = {}
    for name, (argv, _) in direct.items():
        capsys.readouterr()
        rc = grpo.main([str(a) for a in argv])
        results[name] = (rc, capsys.readouterr().err)
    for name, p in procs.items():
        err = p.communicate(timeout=120)[1]
        results[name] = (p.returncode, err)
    for name, (rc, err) in results.items():
        lines = err.strip().splitlines()
        assert rc != 0 and len(lines) == 1 and lines[0].startswith("error: "), (name, err[-2000:])
        assert {**spawned, **direct}[name][1] in lines[0], (name, lines[0])
        print(f"{name:20s} {lines[0]}")
    for run in ("run", "run2"):  # nothing was deleted: the good checkpoint is still there and loadable
        assert sorted(p.name for p in (tmp_path / run).glob("ckpt-*")) == ["ckpt-000001", "ckpt-000002"]
        torch.load(tmp_path / run / "ckpt-000001" / "trainer.pt", weights_only=True)
