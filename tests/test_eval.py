"""eval.py: the pass@k / avg@K estimators, an end-to-end run on a tiny model and a tiny local benchmark
(outputs, resume without regeneration, identical metrics, window sweep plot), adapters (method recorded, wrong
base model refused) and one-line errors for bad input."""
import itertools
import json
import math

import pytest

import eval as ev
from model import load_model
from checkpoint import save_adapters
from pte import AdapterConfig, Adapters

PROBLEMS = [("What is 2+3?", "5"), ("What is 7*6?", "42"), ("Compute 10-4.", "6"), ("What is 9/3?", "3")]


# -----------------------------------------------------------------------------------------------------------
# estimators

def brute_pass_at_k(n, c, k):
    """The fraction of k-subsets of n samples (c correct) that contain at least one correct sample."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert ev.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert ev.pass_at_k(16, 1, 1) == pytest.approx(1 / 16)
    assert ev.pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100))
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 1, 5)


def test_avg_at_k_and_stderr_by_hand():
    # per-problem means 1/4, 3/4, 0, 1 -> mean 1/2; deviations -1/4, 1/4, -1/2, 1/2 -> sum of squares 5/8;
    # sample variance (5/8)/3 = 5/24; stderr sqrt(5/24 / 4) = sqrt(5/96)
    correct = [[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    mean, se = ev.avg_at_k(correct)
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(math.sqrt(5 / 96))
    assert ev.avg_at_k([[1, 0]]) == (0.5, 0.0)


# -----------------------------------------------------------------------------------------------------------
# end to end on a tiny model

@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    with open(d / "gsm8k.jsonl", "w") as f:
        for i, (p, a) in enumerate(PROBLEMS):
            f.write(json.dumps({"id": f"t-{i}", "problem": p, "answer": a}) + "\n")
    return d


def base_args(model_dir, data_dir, out, *extra):
    return ["--model", str(model_dir), "--benchmarks", "gsm8k", "--data-dir", str(data_dir),
            "--out", str(out), "--samples", "2", "--max-new-tokens", "16", "--batch-size", "3", *extra]


def comparable(path):
    r = json.loads(path.read_text())
    r.pop("timing")
    return r


def test_end_to_end_and_resume(qwen_dir, data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert ev.main(base_args(qwen_dir, data_dir, out, "--window", "8", "--temperature", "1.0")) == 0
    printed = capsys.readouterr().out
    assert "8 to generate" in printed and "gsm8k avg@2" in printed and "base W=8" in printed
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == len(PROBLEMS) * 2
    assert {(x["id"], x["sample"]) for x in lines} == {(f"t-{i}", s) for i in range(4) for s in range(2)}
    for x in lines:
        assert x["window"] == 8 and x["benchmark"] == "gsm8k" and 1 <= x["tokens"] <= 16
        assert {"completion", "answer", "correct", "evictions", "truncated"} <= set(x)
    assert any(x["evictions"] > 0 for x in lines)  # 16 tokens through a window of 8: evictions happen
    res = json.loads((out / "results.json").read_text())
    m = res["metrics"]["8"]["benchmarks"]["gsm8k"]
    assert m["problems"] == 4 and m["samples"] == 2 and m["headline"] == "avg@2"
    assert set(m["pass@k"]) == {"1", "2"} and m["pass@k"]["1"] == pytest.approx(m["avg"])
    assert res["config"]["method"] == "base" and res["config"]["temperature"] == 1.0
    assert res["config"]["family"] == "qwen-instruct" and res["config"]["prompt_style"] == "dapo"  # choice 14
    assert res["timing"]["per_window"]["8"]["peak_memory_bytes"] > 0

    # the second identical run generates nothing and writes the same metrics
    def no_generate(*a, **k):
        raise AssertionError("generate called on a resumed run")
    monkeypatch.setattr(ev, "generate", no_generate)
    before = comparable(out / "results.json")
    assert ev.main(base_args(qwen_dir, data_dir, out, "--window", "8", "--temperature", "1.0")) == 0
    assert "0 to generate, 8 cached" in capsys.readouterr().out
    assert len((out / "samples.jsonl").read_text().splitlines()) == len(PROBLEMS) * 2
    assert comparable(out / "results.json") == before


def test_interrupted_run_resumes(qwen_dir, data_dir, tmp_path, capsys):
    """A torn last line (killed mid-write) is skipped; only the missing samples are generated."""
    out = tmp_path / "run"
    assert ev.main(base_args(qwen_dir, data_dir, out, "--window", "full", "--temperature", "0")) == 0
    full = comparable(out / "results.json")
    text = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(text[:5]) + text[5][:20])
    capsys.readouterr()
    assert ev.main(base_args(qwen_dir, data_dir, out, "--window", "full", "--temperature", "0")) == 0
    assert "3 to generate, 5 cached" in capsys.readouterr().out
    assert comparable(out / "results.json") == full  # greedy: regenerated samples are the same


def test_window_sweep_writes_plot(qwen_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert ev.main(base_args(qwen_dir, data_dir, out, "--window", "full,8,4", "--samples", "1")) == 0
    printed = capsys.readouterr().out
    assert "base W=4" in printed and "base W=full" in printed
    png = out / "accuracy_vs_window.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads(png.with_name("results.json").read_text())
    assert list(res["metrics"]) == ["4", "8", "full"]
    assert res["metrics"]["full"]["evictions_per_completion"] == 0
    assert res["metrics"]["4"]["evictions_per_completion"] > res["metrics"]["8"]["evictions_per_completion"]


# -----------------------------------------------------------------------------------------------------------
# adapters

def make_adapter(model_dir, folder, method="pte"):
    model, _ = load_model(str(model_dir))
    ad = Adapters(model, AdapterConfig(method=method, rank=4, n_global=4))
    import torch
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0, 0.1)
    save_adapters(ad, folder, extra={"window": 8})
    return folder


def test_adapter_method_recorded(qwen_dir, data_dir, tmp_path, capsys):
    ad = make_adapter(qwen_dir, tmp_path / "pte")
    out = tmp_path / "run"
    assert ev.main(base_args(qwen_dir, data_dir, out, "--adapter", str(ad), "--samples", "1")) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["method"] == "pte" and res["config"]["windows"] == ["8"]  # window from adapter.json
    assert res["config"]["adapter_meta"]["config"]["method"] == "pte" and res["config"]["adapter_sha256"]
    assert "pte W=8" in capsys.readouterr().out


def test_no_model_evaluates_newest_checkpoint(qwen_dir, data_dir, tmp_path, capsys):
    """`python grpo.py` then `python eval.py --window 768`: with neither --model nor --adapter, the newest
    checkpoint under runs/ is evaluated on its own base model, and the plan (completions, tokens,
    a time estimate) is printed."""
    import os
    old = make_adapter(qwen_dir, tmp_path / "runs" / "grpo" / "ckpt-000001", method="lora_c")
    new = make_adapter(qwen_dir, tmp_path / "runs" / "grpo" / "ckpt-000002")
    os.utime(old / "adapter.json", (1, 1))  # older than the other one whatever the file system's clock says
    args = base_args(qwen_dir, data_dir, tmp_path / "run", "--window", "8", "--runs", str(tmp_path / "runs"))
    assert ev.main(args[2:]) == 0  # without "--model", qwen_dir
    printed = capsys.readouterr().out
    assert f"with adapters {new}" in printed and "newest checkpoint" in printed
    assert "plan: 8 completions" in printed and "tok/s" in printed
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["config"]["method"] == "pte" and res["config"]["model"] == str(qwen_dir)


def test_adapter_for_another_base_model(qwen_dir, llama_dir, data_dir, tmp_path, capsys):
    ad = make_adapter(llama_dir, tmp_path / "llama_pte")
    assert ev.main(base_args(qwen_dir, data_dir, tmp_path / "run", "--adapter", str(ad))) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "base model" in err[0]


# -----------------------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("extra, needle", [
    (["--benchmarks", "gsm8k,nope"], "math500"),  # the message lists the valid names
    (["--window", "0"], "--window"),
    (["--window", "8,abc"], "--window"),
    (["--samples", "0"], "--samples"),
])
def test_bad_input_one_line_error(qwen_dir, data_dir, tmp_path, capsys, extra, needle):
    assert ev.main(base_args(qwen_dir, data_dir, tmp_path / "run", *extra)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    if needle == "math500":
        assert all(b in err[0] for b in ev.BENCHMARKS)


def test_missing_data_file_offline(qwen_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ev.main(base_args(qwen_dir, empty, tmp_path / "run")) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "gsm8k" in err[0]
