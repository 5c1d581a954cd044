"""``minivit gan`` and ``minivit sample``: a tiny run end to end, exact resume, anomaly stops, one-line errors."""

import json

import numpy as np
import pytest

from minivit import checkpoint, cli, gan_train, nn, optim
from minivit.gan_train import GanSettings, train_gan
from tests.test_cli import assert_one_line_error, run_cli

SMALL = ["--limit", "256", "--batch-size", "32", "--embed-dim", "16", "--depth", "1", "--latent-dim", "16",
         "--grid", "16", "--no-progress"]
SETTINGS = dict(limit=256, batch_size=32, embed_dim=16, depth=1, latent_dim=16, grid=16)


def quiet(*args):
    pass


def test_a_tiny_run_end_to_end_writes_grids_curves_metrics_and_samples(capsys, tmp_path):
    classifier = nn.VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=8, depth=1,
                                      num_heads=2)
    classifier_path = checkpoint.save_checkpoint(tmp_path / "classifier.safetensors", classifier,
                                                 train_settings={"dataset": "fashion-mnist-mini"})
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "gan", "--epochs", "2", "--out", out, "--classifier", classifier_path,
                                "--eval-samples", "64", "--patch-kernel", "11", "--minibatch-std", "4", *SMALL)
    assert code == 0, err
    assert "epoch   2/2  loss D" in stdout and "FD " in stdout
    from PIL import Image
    with Image.open(out / "samples.gif") as gif:   # the grids of the two epochs, animated
        assert gif.n_frames == 2
    for name in ("checkpoint.safetensors", "curves.png", "metrics.jsonl", "samples/epoch-001.png",
                 "samples/epoch-002.png"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss_d"]) and np.isfinite(r["loss_g"]) for r in rows)
    assert all(0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and sum(r["class_histogram"]) == 64
               for r in rows)
    # the generator learned: its weights moved away from their initial values
    state = checkpoint.load_training_state(out / "checkpoint.safetensors", gan_train.FORMAT)
    initial = nn.ViTGenerator(**state.configs["generator"]).state_dict()
    assert any(not np.array_equal(initial[k], v) for k, v in state.models["generator"].items())
    assert set(state.models) == {"generator", "discriminator", "generator_ema"}
    assert state.configs["discriminator"]["patch_kernel"] == 11          # overlapping 11x11 windows, stride 7
    assert state.models["discriminator"]["patch_embed.proj.weight_orig"].shape == (16, 1, 11, 11)
    assert state.configs["discriminator"]["minibatch_std"] == 4          # the head reads 16 features + the spread
    assert state.models["discriminator"]["head.weight_orig"].shape == (1, 17)

    code, stdout, err = run_cli(capsys, "sample", out, "--n", "9", "--out", tmp_path / "grid.png")
    assert code == 0, err
    assert (tmp_path / "grid.png").stat().st_size > 0 and "wrote 9 images" in stdout


@pytest.mark.parametrize("options", [dict(), dict(loss="wgan-gp", n_critic=2, spectral_norm="plain",
                                                  l2_attention=False, ema=0.0, minibatch_std=4)])
def test_a_resumed_run_ends_bit_for_bit_as_an_uninterrupted_one(tmp_path, options):
    straight = train_gan(GanSettings(epochs=2, **SETTINGS, **options), tmp_path / "straight", progress=False,
                         log=quiet)
    train_gan(GanSettings(epochs=1, **SETTINGS, **options), tmp_path / "halves", progress=False, log=quiet)
    resumed = train_gan(GanSettings(), tmp_path / "halves", resume=tmp_path / "halves" / "checkpoint.safetensors",
                        epochs=2, progress=False, log=quiet)
    a, meta_a = checkpoint.load_tensors(straight["paths"]["checkpoint"])
    b, meta_b = checkpoint.load_tensors(resumed["paths"]["checkpoint"])
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert json.loads(meta_a["metadata"])["rng"] == json.loads(meta_b["metadata"])["rng"]
    losses = [(h["loss_d"], h["loss_g"]) for h in straight["history"]]
    assert losses == [(h["loss_d"], h["loss_g"]) for h in resumed["history"]]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # back-propagating the NaN
@pytest.mark.parametrize("network", ["discriminator", "generator"])
def test_a_non_finite_loss_stops_the_run_naming_the_network_and_the_step(capsys, tmp_path, monkeypatch, network):
    d_loss, g_loss = gan_train.losses("non-saturating")
    if network == "discriminator":
        monkeypatch.setattr(gan_train, "losses", lambda name: (lambda r, f: d_loss(r, f) * np.nan, g_loss))
    else:
        monkeypatch.setattr(gan_train, "losses", lambda name: (d_loss, lambda f: g_loss(f) * np.inf))
    code, _, err = run_cli(capsys, "gan", "--epochs", "1", "--out", tmp_path / "run", *SMALL)
    assert code == 1
    assert_one_line_error(err, f"the {network}'s loss became {'nan' if network == 'discriminator' else 'inf'} "
                               "at step 1 (epoch 1, batch 1)")


def test_bad_flags_get_one_line_errors(capsys, tmp_path):
    cases = [
        (["--loss", "wasserstein"], "--loss must be one of 'minimax', 'non-saturating', 'hinge', 'wgan-gp', got "
                                    "'wasserstein'"),
        (["--n-critic", "0"], "--n-critic 0 is out of range: expected >= 1"),
        (["--beta2", "1.5"], "--beta2 1.5 is out of range: expected [0, 1)"),
        (["--spectral-norm", "on"], "--spectral-norm must be one of 'none', 'plain', 'improved', got 'on'"),
        (["--patch-size", "5"], "--patch-size 5 does not divide the 28x28 images of fashion-mnist-mini"),
        (["--patch-kernel", "10"], "--patch-kernel 10 must be 0 (no overlap) or at least --patch-size 7 with an even "
                                   "difference"),
        (["--minibatch-std", "3"], "--minibatch-std 3 must be 0 (off) or a group size >= 2 that divides "
                                   "--batch-size 64"),
        (["--minibatch-std", "1"], "--minibatch-std 1 must be 0 (off) or a group size >= 2"),
        (["--loss", "wgan-gp", "--gp-weight", "0"], "--loss wgan-gp needs a positive --gp-weight"),
        (["--classifier", tmp_path / "none.safetensors"], "none.safetensors: no such file"),
        (["--lr-g", "fast"], "argument --lr-g: invalid float value: 'fast'"),
        (["--preset", "cifar10"], "argument --preset: invalid choice: 'cifar10'"),
    ]
    for flags, message in cases:
        code, _, err = run_cli(capsys, "gan", "--out", tmp_path / "run", *flags)
        assert code == 2, flags
        assert_one_line_error(err, message)
    assert not (tmp_path / "run").exists()


def test_resume_and_sample_refuse_what_they_cannot_do(capsys, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["gan", "--epochs", "1", "--out", str(out)] + SMALL) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, "gan", "--resume", out, "--loss", "hinge")
    assert code == 2
    assert_one_line_error(err, "drop --loss")
    code, _, err = run_cli(capsys, "gan", "--resume", out)
    assert code == 2
    assert_one_line_error(err, "has finished all 1 epoch; extend it with --epochs N (N > 1)")
    code, _, err = run_cli(capsys, "sample", out, "--n", "0")
    assert code == 2
    assert_one_line_error(err, "--n must be at least 1, got 0")
    classifier = nn.VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=8, depth=1,
                                      num_heads=2)
    other = checkpoint.save_checkpoint(tmp_path / "classifier.safetensors", classifier)
    code, _, err = run_cli(capsys, "sample", other)
    assert code == 1
    assert_one_line_error(err, "not a minivit.gan.v1 checkpoint (format 'minivit.checkpoint.v1')")


def test_the_ema_follows_the_generator_and_forgets_its_start_early():
    assert optim.ema_decay(0.999, 0) == pytest.approx(0.1)
    assert optim.ema_decay(0.999, 10 ** 6) == 0.999
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    before = ema.weight.data.copy()
    optim.update_ema(ema, model, 0.75)
    np.testing.assert_allclose(ema.weight.data, 0.75 * before + 0.25 * model.weight.data, rtol=1e-6)


def test_a_minutes_budget_ends_the_epoch_in_progress_saves_it_and_a_larger_budget_continues(capsys, tmp_path):
    out = tmp_path / "run"
    # a budget far below one step: the first epoch ends after its first step, is measured and saved
    code, stdout, err = run_cli(capsys, "gan", "--epochs", "3", "--minutes", "1e-9", "--out", out, *SMALL)
    assert code == 0, err
    assert "budget ran out after 1 of 8 steps" in stdout and "epoch   2/3" not in stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["steps"], r["step"]) for r in rows] == [(1, 1, 1)]
    assert rows[0]["training_time_s"] == rows[0]["epoch_time_s"] > 0
    assert (out / "samples" / "epoch-001.png").stat().st_size > 0
    state = checkpoint.load_training_state(out / "checkpoint.safetensors", gan_train.FORMAT)
    assert state.metadata["epoch"] == 1 and state.metadata["settings"]["minutes"] == 1e-9

    # the budget is spent: resuming needs a new one, and says so
    code, stdout, err = run_cli(capsys, "gan", "--resume", out, "--no-progress")
    assert code == 2
    assert_one_line_error(err, "has spent its training time")
    assert "--minutes" in err
    # no budget (0): the next epoch runs whole, the run ends at --epochs
    code, stdout, err = run_cli(capsys, "gan", "--resume", out, "--minutes", "0", "--epochs", "2", "--no-progress")
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["steps"], r["step"]) for r in rows] == [(1, 1, 1), (2, 8, 16)]
    assert rows[1]["training_time_s"] == pytest.approx(rows[0]["epoch_time_s"] + rows[1]["epoch_time_s"])


@pytest.mark.parametrize("preset", list(gan_train.PRESETS))
def test_every_preset_is_valid_and_its_networks_fit_its_images(preset):
    from minivit import data
    s = gan_train.settings_for(preset)
    info = data.dataset_info(s.dataset)
    G, D = gan_train.build_generator(s, info), gan_train.build_discriminator(s, info)
    images = G(np.random.default_rng(0).standard_normal((2, s.latent_dim)).astype(np.float32))
    assert images.shape == (2, *info.shape)
    assert D(images).shape == (2,)                         # one logit per image
    assert D.config.get("patch_kernel") == (s.patch_kernel or None)
    assert D.config.get("minibatch_std", 0) == s.minibatch_std
