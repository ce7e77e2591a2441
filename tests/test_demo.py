"""The paper in miniature, reduced (demo.py: the real GRPO loop on a toy task): after equal GRPO budgets under
the same window, pte answers better than lora_c, and its replay memory stays close to lora_c's."""
import json

import pytest

import demo


@pytest.mark.usefixtures("one_thread")  # demo.main sets 1 thread; the fixture restores the count after
def test_reduced_demo_pte_beats_lora_c(tmp_path):
    r = demo.main(["--out", str(tmp_path), "--base-steps", "400", "--steps", "50", "--filler", "8",
                   "--methods", "lora_c,pte", "--eval-problems", "100", "--quiet"])
    acc = {row["method"]: row["accuracy"] for row in r["rows"]}
    mem = {row["method"]: row["peak_memory_bytes"] for row in r["rows"] if row["peak_memory_bytes"]}
    assert acc["base (full cache)"] >= 0.9 and acc["base (window 8)"] <= 0.3, acc  # the window gap exists
    assert acc["pte"] > acc["lora_c"] + 0.1, acc
    assert mem["pte"] < 1.3 * mem["lora_c"], mem
    assert json.loads((tmp_path / "demo.json").read_text())["rows"] and (tmp_path / "demo.png").exists()
