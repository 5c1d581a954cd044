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


def test_time_to_accuracy_trains_both_and_writes_the_table_and_the_plot(tmp_path):
    try:
        import torch  # noqa: F401
        only = []
    except ImportError:
        only = ["--only", "minivit"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "time_to_accuracy.py"), "--preset", "fashion15", "--dataset",
           "fashion-mnist-mini", "--limit", "300", "--epochs", "2", "--out", str(tmp_path), "--run-dir",
           str(tmp_path / "run")] + only
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    runs = json.loads((tmp_path / "time-to-accuracy-fashion15.json").read_text())
    assert runs["minivit"][-1]["epoch"] == 2 and (tmp_path / "time-to-accuracy-fashion15.png").exists()
    for rows in runs.values():
        assert [r["epoch"] for r in rows] == [1, 2] and all(0 <= r["test_acc"] <= 1 for r in rows)
        assert rows[0]["wall_s"] < rows[1]["wall_s"]
    if not only:   # same weights, same batches, same views (shifted ones at the end): the same accuracy up to
        for epoch in range(2):                          # float32 rounding
            accuracy = [rows[epoch]["test_acc"] for rows in runs.values()]
            assert abs(accuracy[0] - accuracy[1]) <= 0.02, (epoch, accuracy)


def test_gan_variants_trains_each_loss_on_a_budget_and_writes_the_table_curve_and_grids(tmp_path):
    from minivit import checkpoint, nn
    classifier = nn.VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=8, depth=1,
                                      num_heads=2)
    path = checkpoint.save_checkpoint(tmp_path / "classifier.safetensors", classifier,
                                      train_settings={"dataset": "fashion-mnist-mini"})
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gan_variants.py"), "--classifier", str(path), "--preset",
           "tiny", "--limit", "256", "--epochs", "2", "--minutes", "0.001", "--only", "hinge", "wgan-gp",
           "--jobs", "2", "--run-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "out" / "table.md").read_text()
    assert "| hinge + SN |" in text and "| WGAN-GP |" in text and "| real data (floor) |" in text
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["runs"]) == {"hinge", "wgan-gp"}
    for rows in results["runs"].values():   # 0.06 s of training: the first epoch is cut short, the run ends
        assert len(rows) == 1 and rows[0]["steps"] < 4 and rows[0]["frechet_distance"] > 0
    assert 0 <= results["floor"]["frechet_distance"] < min(r[-1]["frechet_distance"]
                                                            for r in results["runs"].values())
    for name in ("frechet-distance.png", "samples-hinge.png", "samples-wgan-gp.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    for name in ("hinge", "wgan-gp"):     # two at a time: each process logs to a file of its own
        assert "loss D" in (tmp_path / "runs" / f"{name}.log").read_text()
    # the table's figures: each last generator measured again with more images (here all 256 test images)
    assert set(results["final"]) == {"hinge", "wgan-gp"} and results["final_floor"]["n"] == 256
    assert "measured with 256 generated images" in text
    # --no-train tabulates the runs already there; --final-samples 0 shows the last epoch's own measurement
    again = subprocess.run(cmd[:-1] + [str(tmp_path / "again"), "--no-train", "--final-samples", "0"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "again" / "results.json").read_text())["runs"] == results["runs"]
    assert "per measurement" in (tmp_path / "again" / "table.md").read_text()
