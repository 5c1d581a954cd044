"""The benchmark script runs end to end on a tiny case (its numbers are not checked: timings belong in the
benchmark, not in tests), and its FLOP count matches a count by hand."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_step  # noqa: E402


def test_flops_by_hand_for_one_block():
    c = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2.0)
    Np, N, D, F = 4, 5, 8, 16
    by_hand = (2 * Np * 16 * D                                  # patch embedding
               + 2 * N * (D * 3 * D) + 2 * N * D * D             # qkv, proj
               + 2 * N * D * F * 2                               # fc1, fc2
               + 2 * N * N * D * 2                               # q k^T and p v over all heads
               + 2 * D * 3)                                      # head
    assert train_step.forward_flops(c, batch=1) == by_hand
    assert train_step.forward_flops(c, batch=3) == 3 * by_hand


def test_benchmark_runs_and_reports_every_column(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--preset", "bench", "--batch", "4",
           "--steps", "2", "--warmup", "1", "--rounds", "1", "--json", str(out)]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    assert "| bench | 4 |" in text and "GEMM peak" in text and "import-only / command" in text
    result = json.loads(out.read_text())["results"][0]
    assert result["minivit"]["ms"] > 0 and result["minivit"]["peak_mb"] >= 0
    assert len(result["minivit"]["round_medians"]) == 1 and result["minivit-cli"]["ms"] > 0
    assert result["minivit"]["threads"] >= 1   # the library's default, in a process that only imported it
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.skip("PyTorch is not installed: the comparison columns are empty")
    assert result["pytorch"]["ms"] > 0 and result["pytorch"]["peak_mb"] >= 0
    low, high = result["ratio_range"]
    assert 0 < low <= high
    assert re.search(r"\| \d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\) \|", text), text


def test_paired_mode_runs_both_in_one_process(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--paired", "--preset", "bench", "--batch",
           "4", "--steps", "2", "--warmup", "1", "--pause", "0", "--no-torch"]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    assert "both in one process" in text and "| bench | 4 |" in text
