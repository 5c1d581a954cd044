"""``minivit vae``: a tiny run end to end, exact resume after an interruption, and bad flags as one-line errors."""

import json
import math
import shutil

import numpy as np
import pytest

from minivit import checkpoint, vae_train
from tests.test_cli import assert_one_line_error, run_cli

SMALL = ["--limit", "200", "--embed-dim", "16", "--depth", "1", "--num-heads", "2", "--batch-size", "50",
         "--latent-dim", "2", "--iwae-k", "5", "--no-progress"]


@pytest.fixture(scope="module")
def finished_vae(tmp_path_factory):
    """A finished two-epoch run with a 2-D latent, trained once; tests copy it."""
    from minivit import cli
    out = tmp_path_factory.mktemp("vae") / "run"
    assert cli.main(["vae", "--epochs", "2", "--out", str(out)] + SMALL) == 0
    return out


def test_a_tiny_run_writes_bounds_metrics_checkpoint_and_pictures(finished_vae):
    names = {p.name for p in finished_vae.iterdir()}
    assert {"checkpoint.safetensors", "metrics.jsonl", "curves.png", "eval.json", "reconstructions.png",
            "samples.png", "interpolations.png", "manifold.png", "latent.png"} <= names
    rows = [json.loads(line) for line in (finished_vae / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    report = json.loads((finished_vae / "eval.json").read_text())
    assert report["images"] == 200 and report["iwae_k"] == 5
    assert report["test_nelbo_nats"] == pytest.approx(rows[-1]["test_nelbo"])
    assert report["test_nelbo_bits_per_dim"] == pytest.approx(report["test_nelbo_nats"] / (784 * math.log(2)))
    # a Bernoulli likelihood is at most 1 per pixel, so both bounds on -log p(x) are positive nats
    assert report["test_nelbo_nats"] > 0 and report["test_iwae_nats"] > 0 and report["test_kl_nats"] >= 0
    assert checkpoint.load_checkpoint(finished_vae / "checkpoint.safetensors").epoch == 2


def test_an_interrupted_run_resumed_ends_with_the_weights_of_an_uninterrupted_one(capsys, tmp_path, monkeypatch):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    code, _, _ = run_cli(capsys, "vae", "--epochs", "3", "--out", straight, *SMALL)
    assert code == 0
    calls, original = [], vae_train.evaluate_elbo

    def evaluate_elbo(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:            # Ctrl-C after the second epoch trained, before its checkpoint
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(vae_train, "evaluate_elbo", evaluate_elbo)
    code, _, err = run_cli(capsys, "vae", "--epochs", "3", "--out", broken, *SMALL)
    assert code == 130 and f"holds epoch 1 of 3: continue with  minivit vae --resume {broken}" in err
    monkeypatch.setattr(vae_train, "evaluate_elbo", original)
    code, printed, _ = run_cli(capsys, "vae", "--resume", broken, "--no-progress")
    assert code == 0 and "resuming" in printed
    a = checkpoint.load_checkpoint(straight / "checkpoint.safetensors")
    b = checkpoint.load_checkpoint(broken / "checkpoint.safetensors")
    assert a.epoch == b.epoch == 3
    for name, value in a.model_state.items():
        assert np.array_equal(value, b.model_state[name]), name
    assert [r["test_nelbo"] for r in a.history] == [r["test_nelbo"] for r in b.history]


@pytest.mark.parametrize("flags, message", [
    (["--beta", "-1"], "--beta -1.0 is out of range"),
    (["--likelihood", "poisson"], "--likelihood must be one of 'bernoulli', 'gaussian'"),
    (["--patch-size", "5"], "--patch-size 5 does not divide the 28x28 images"),
    (["--latent-dim", "0"], "--latent-dim 0 is out of range"),
    (["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
    (["--preset", "cifar10"], "argument --preset: invalid choice"),
])
def test_bad_flags_are_one_line_errors_before_training(capsys, tmp_path, flags, message):
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, "vae", "--out", out, *flags)
    assert code == 2
    assert_one_line_error(err, message)
    assert not out.exists()


def test_resume_refuses_new_settings_and_finished_runs(capsys, finished_vae, tmp_path):
    run = shutil.copytree(finished_vae, tmp_path / "run")
    code, _, err = run_cli(capsys, "vae", "--resume", run, "--beta", "2")
    assert code == 2
    assert_one_line_error(err, "drop --beta")
    code, _, err = run_cli(capsys, "vae", "--resume", run)
    assert code == 2
    assert_one_line_error(err, "has finished all 2 epochs; extend it with --epochs N")


def test_resuming_a_classifier_checkpoint_is_refused(capsys, tmp_path):
    from tests.test_cli import SMALL as TRAIN_SMALL
    out = tmp_path / "vit"
    assert run_cli(capsys, "train", "--epochs", "1", "--out", out, *TRAIN_SMALL)[0] == 0
    code, _, err = run_cli(capsys, "vae", "--resume", out)
    assert code == 1
    assert_one_line_error(err, "not a checkpoint of minivit vae")
