"""The training loop and the command line, end to end on small runs."""

import dataclasses
import json
import re

import numpy as np
import pytest
from scipy.special import softmax

from minivit import checkpoint, cli, data, no_grad
from minivit import train as train_module
from minivit.nn import VisionTransformer
from minivit.train import SettingsError, TrainingDiverged, TrainSettings, settings_for, validate
from tests.test_cli import assert_one_line_error, run_cli

SMALL = ["--limit", "300", "--embed-dim", "16", "--depth", "1", "--num-heads", "2", "--batch-size", "50",
         "--no-progress"]


def test_cli_trains_evaluates_and_exports(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "2", "--out", str(out)] + SMALL) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "epoch   2/2" in printed
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in lines] == [1, 2]
    assert all(0 <= h["test_acc"] <= 1 and h["train_loss"] > 0 for h in lines)
    assert lines[1]["train_loss"] < lines[0]["train_loss"]
    assert (out / "curves.png").stat().st_size > 1000
    assert cli.main(["eval", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "Ankle boot" in printed
    report = json.loads((out / "eval.json").read_text())
    assert report["images"] == 300 and np.sum(report["confusion_matrix"]) == 300
    assert abs(report["accuracy"] - lines[-1]["test_acc"]) < 1e-9
    assert (out / "confusion.png").exists() and (out / "mistakes.png").exists()
    assert cli.main(["export", str(out), str(tmp_path / "w.npz")]) == 0
    assert "head.weight" in checkpoint.read_state_dict(tmp_path / "w.npz")


def random_model_and_images(n, seed):
    """A small random ViT and ``n`` random 28x28 grey images with labels, to evaluate."""
    rng = np.random.default_rng(seed)
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=16, depth=1,
                              num_heads=2)
    return model, rng.integers(0, 256, size=(n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n)


def test_flip_tta_averages_the_probabilities_of_each_image_and_its_mirror_image():
    model, images, labels = random_model_and_images(40, seed=0)
    mean, std = [0.29], [0.35]
    plain = train_module.evaluate(model, images, labels, mean, std, batch_size=16)
    tta = train_module.evaluate(model, images, labels, mean, std, batch_size=16, flip=True)

    x = data.DataLoader(images, labels, 40, mean, std).normalize(images)
    with no_grad():
        p1 = softmax(model(x).data.astype(np.float64), axis=1)
        p2 = softmax(model(np.ascontiguousarray(x[..., ::-1])).data.astype(np.float64), axis=1)
    assert not np.allclose(p1, p2, atol=1e-3)      # the mirror image changes what the model sees
    p = (p1 + p2) / 2
    rows = np.arange(len(labels))
    np.testing.assert_array_equal(plain["predictions"], p1.argmax(1))
    np.testing.assert_allclose(plain["loss"], -np.log(p1[rows, labels]).mean(), rtol=1e-5)
    np.testing.assert_array_equal(tta["predictions"], p.argmax(1))
    np.testing.assert_allclose(tta["confidences"], p.max(1), rtol=1e-5)
    np.testing.assert_allclose(tta["loss"], -np.log(p[rows, labels]).mean(), rtol=1e-5)
    assert tta["acc"] == (p.argmax(1) == labels).mean()


def test_flip_tta_flag_is_saved_and_used_by_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "1", "--augment", "--flip-tta", "--out", str(out)] + SMALL) == 0
    ckpt = checkpoint.load_checkpoint(out / "checkpoint.safetensors")
    assert ckpt.train_settings["flip_tta"] is True
    assert cli.main(["eval", str(out)]) == 0
    assert "mirror image" in capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert report["flip_tta"] is True
    assert abs(report["accuracy"] - ckpt.history[-1]["test_acc"]) < 1e-9


def test_shift_tta_averages_the_moved_images_with_background_moved_in():
    model, images, labels = random_model_and_images(30, seed=1)
    mean, std = [0.29], [0.35]
    tta = train_module.evaluate(model, images, labels, mean, std, batch_size=16, flip=True, shift=1)

    loader = data.DataLoader(images, labels, 30, mean, std)
    probs = []
    for dy, dx in [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]:
        moved = np.zeros((30, 1, 30, 30), np.uint8)              # pixel by pixel: pad with 0, cut the window
        moved[:, :, 1:29, 1:29] = images
        moved = moved[:, :, 1 - dy:29 - dy, 1 - dx:29 - dx]
        for view in (moved, moved[..., ::-1]):
            with no_grad():
                probs.append(softmax(model(loader.normalize(np.ascontiguousarray(view))).data.astype(np.float64), 1))
    assert not np.allclose(probs[0], probs[2], atol=1e-3)   # moving the image changes what the model sees
    p = np.mean(probs, axis=0)
    np.testing.assert_array_equal(tta["predictions"], p.argmax(1))
    np.testing.assert_allclose(tta["confidences"], p.max(1), rtol=1e-5)
    np.testing.assert_allclose(tta["loss"], -np.log(p[np.arange(30), labels]).mean(), rtol=1e-5)
    with pytest.raises(ValueError, match=r"a shift of \(28, 0\) pixels leaves nothing of 28x28 images"):
        data.shift_images(loader.normalize(images), 28, 0, 0.0)
    with pytest.raises(SettingsError, match="--tta-shift 28 would move the 28x28 images of fashion-mnist out of"):
        settings_for("fashion15", tta_shift=28)


def test_tta_is_used_after_the_last_epoch_only_and_by_eval(tmp_path, capsys, monkeypatch):
    views, evaluate = [], train_module.evaluate

    def recording(*args, **kwargs):
        views.append((kwargs["flip"], kwargs["shift"]))
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(train_module, "evaluate", recording)
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "2", "--augment", "--flip-tta", "--tta-shift", "1", "--val-size", "100",
                     "--out", str(out)] + SMALL) == 0
    assert views == [(False, 0), (True, 1), (True, 1)]       # val after epoch 1; val and test after the last
    assert ("averaged over 10 views: moved by up to 1 pixel up, down, left and right, each also mirrored"
            in capsys.readouterr().out)
    ckpt = checkpoint.load_checkpoint(out / "checkpoint.safetensors")
    assert cli.main(["eval", str(out)]) == 0
    assert views[-1] == (True, 1)
    report = json.loads((out / "eval.json").read_text())
    assert report["tta_shift"] == 1 and abs(report["accuracy"] - ckpt.history[-1]["test_acc"]) < 1e-9


def test_resume_ends_with_exactly_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    flags = ["--epochs", "3", "--drop-rate", "0.2", "--pool", "avg", "--ema", "0.9"] + SMALL
    assert cli.main(["train", "--out", str(tmp_path / "straight")] + flags) == 0

    # The same run, interrupted right after the checkpoint of epoch 2 was written.
    original = checkpoint.save_checkpoint

    def save_then_stop(*args, epoch=0, **kwargs):
        path = original(*args, epoch=epoch, **kwargs)
        if epoch == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)
    cut = tmp_path / "cut"
    assert cli.main(["train", "--out", str(cut)] + flags) == 130
    monkeypatch.setattr(checkpoint, "save_checkpoint", original)
    assert checkpoint.load_checkpoint(cut / "checkpoint.safetensors").epoch == 2

    assert cli.main(["train", "--resume", str(cut), "--no-progress"]) == 0
    straight = checkpoint.load_checkpoint(tmp_path / "straight" / "checkpoint.safetensors")
    resumed = checkpoint.load_checkpoint(cut / "checkpoint.safetensors")
    assert resumed.epoch == straight.epoch == 3
    for k, v in straight.model_state.items():
        np.testing.assert_array_equal(resumed.model_state[k], v, err_msg=k)
        np.testing.assert_array_equal(resumed.ema_state[k], straight.ema_state[k], err_msg=k)
    for i, state in straight.optimizer_state["state"].items():
        np.testing.assert_array_equal(resumed.optimizer_state["state"][i]["exp_avg"], state["exp_avg"])
    assert [h["test_acc"] for h in resumed.history] == [h["test_acc"] for h in straight.history]
    assert len((cut / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_validation_split_is_judged_each_epoch_and_the_test_set_once_with_the_moving_average(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "2", "--val-size", "100", "--ema", "0.5", "--out", str(out)] + SMALL) == 0
    printed = capsys.readouterr().out
    assert "(200 train / 300 test images)" in printed   # --limit 300, the last 100 training images held out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= row["val_acc"] <= 1 for row in rows)
    assert rows[0]["test_acc"] is None and 0 <= rows[1]["test_acc"] <= 1
    ckpt = checkpoint.load_checkpoint(out / "checkpoint.safetensors")
    assert any(not np.array_equal(ckpt.ema_state[k], v) for k, v in ckpt.model_state.items())
    model, _ = checkpoint.model_from_checkpoint(out / "checkpoint.safetensors")   # the weights that were judged
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, ckpt.ema_state[k])
    assert cli.main(["eval", str(out)]) == 0
    assert abs(json.loads((out / "eval.json").read_text())["accuracy"] - rows[1]["test_acc"]) < 1e-9
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "y", "--val-size", "300", *SMALL)
    assert code == 2
    assert_one_line_error(err, "--val-size 300 leaves no training images: the training set has 300")


@pytest.mark.parametrize("flags, message", [
    (["--patch-size", "5"], "--patch-size 5 does not divide the 28x28 images"),
    (["--embed-dim", "30", "--num-heads", "4"], "--embed-dim 30 is not divisible by --num-heads 4"),
    (["--lr", "-1"], "--lr -1.0 is out of range: expected > 0"),
    (["--lr", "nan"], "--lr nan is out of range: expected > 0"),
    (["--epochs", "0"], "--epochs 0 is out of range: expected >= 1"),
    (["--minutes", "-1"], "--minutes -1.0 is out of range: expected >= 0"),
    (["--pool", "max"], "--pool must be one of 'token', 'avg', got 'max'"),
    (["--preset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--dataset", "svhn"], "unknown dataset 'svhn'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
    # issue 18, item 1: values that trained silently wrong
    (["--clip-grad", "-1"], "--clip-grad -1.0 is out of range: expected >= 0"),
    (["--min-lr", "-0.01"], "--min-lr -0.01 is out of range: expected >= 0"),
    (["--min-lr", "0.1", "--lr", "0.01"], "--min-lr 0.1 is above --lr 0.01"),
    (["--warmup-epochs", "3", "--epochs", "2"], "--warmup-epochs 3.0 is longer than the run (--epochs 2)"),
    # issue 18, item 10: values that ended in tracebacks
    (["--mlp-ratio", "0"], "--mlp-ratio 0.0 is out of range: expected > 0"),
    (["--drop-rate", "1.5"], "--drop-rate 1.5 is out of range: expected [0, 1)"),
    (["--seed", "-1"], "--seed -1 is out of range: expected [0, 4294967295]"),
    (["--label-smoothing", "1"], "--label-smoothing 1.0 is out of range: expected [0, 1)"),
    (["--limit", "-5"], "--limit -5 is out of range: expected >= 0"),
    (["--patch-kernel", "5"], "--patch-kernel 5 must be 0 (no overlap) or at least --patch-size 7 with an even"),
    (["--ema", "1.5"], "--ema 1.5 is out of range: expected [0, 1)"),
    (["--stem-channels", "-8"], "--stem-channels -8 is out of range: expected >= 0"),
    (["--stem-depth", "0"], "--stem-depth 0 is out of range: expected >= 1"),
    (["--stem-stride", "3"], "--stem-stride 3 is out of range: expected [1, 2]"),
    (["--preset", "fashion", "--stem-channels", "8", "--stem-depth", "3", "--stem-stride", "2"],
     "--patch-size 4 is not divisible by 8, the stride of 3 stem layers of --stem-stride 2"),
    (["--preset", "fashion", "--stem-channels", "8", "--stem-stride", "2", "--patch-kernel", "3"],
     "--patch-kernel 3 must be 0 (no overlap) or at least 2, the patch on the stem's output (--patch-size 4 / 2), "
     "with an even difference"),
])
def test_bad_flags_are_one_line_errors_with_exit_code_2(flags, message, capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--out", tmp_path / "x", *flags)
    assert code == 2
    assert_one_line_error(err, message)
    assert not (tmp_path / "x").exists()


def test_a_preset_scales_its_warmup_to_the_run_instead_of_refusing():
    one = settings_for("cifar10", epochs=1)
    assert one.epochs == 1 and one.warmup_epochs == pytest.approx(0.1)  # 5 of 50 epochs -> 0.1 of 1
    assert settings_for("cifar10").warmup_epochs == 5.0
    assert settings_for("cifar10", epochs=1, warmup_epochs=0.5).warmup_epochs == 0.5  # the user's own value stays
    with pytest.raises(SettingsError, match=r"--warmup-epochs 3 is longer than the run \(--epochs 1\)"):
        settings_for("cifar10", epochs=1, warmup_epochs=3)


def test_a_preset_on_a_cut_training_set_keeps_enough_steps_per_epoch():
    full = settings_for("fashion")
    cut = settings_for("fashion", limit=8000)   # 63 batches of 128: the warmup would be over in 63 steps
    assert (cut.batch_size, cut.lr) == (32, pytest.approx(full.lr / 2)) and cut.warmup_epochs == full.warmup_epochs
    assert 8000 // cut.batch_size >= 250
    assert settings_for("fashion", limit=20000).batch_size == 80
    assert settings_for("fashion", limit=8000, batch_size=128).batch_size == 128    # the user's own values stay
    assert settings_for("fashion", limit=8000, lr=5e-3).lr == 5e-3
    assert settings_for("fashion", limit=70000).batch_size == full.batch_size == 128
    assert settings_for("tiny").batch_size == 64      # a preset on its whole data set is as written


def test_crop_padding_defaults_to_an_eighth_of_the_side_and_zero_means_flips_only():
    info = data.dataset_info("fashion-mnist")
    assert train_module.crop_padding(settings_for("fashion", augment=True), info) == 3
    assert train_module.crop_padding(settings_for("fashion15"), info) == 0
    with pytest.raises(SettingsError, match="--crop-pad -2 is out of range"):
        settings_for("fashion15", crop_pad=-2)


def test_random_erasing_is_an_augmentation_with_a_probability():
    assert settings_for("fashion15", erase=0.25).erase == 0.25
    with pytest.raises(SettingsError, match="--erase 0.25 needs --augment"):
        settings_for("fashion", erase=0.25)
    with pytest.raises(SettingsError, match=r"--erase 1.5 is out of range: expected \[0, 1\]"):
        settings_for("fashion15", erase=1.5)


def test_a_stem_setting_builds_that_many_3x3_convolutions_before_the_patch_projection():
    info = data.dataset_info("fashion-mnist")
    model = train_module.build_model(settings_for("fashion", stem_channels=16, stem_depth=2), info)
    assert [conv.weight.shape for conv in model.patch_embed.stem] == [(16, 1, 3, 3), (16, 16, 3, 3)]
    assert model.patch_embed.proj.weight.shape == (64, 16, 4, 4)
    assert not train_module.build_model(settings_for("fashion", stem_depth=2), info).patch_embed.stem   # no width


def test_settings_of_the_wrong_type_are_named():
    for values, message in (({"epochs": 2.5}, "--epochs must be a whole number, got 2.5"),
                            ({"lr": "0.1"}, "--lr must be a number, got '0.1'"),
                            ({"drop_rate": float("inf")}, "--drop-rate inf is out of range: expected [0, 1)")):
        with pytest.raises(SettingsError, match=re.escape(message)):
            validate(TrainSettings(**values))
    assert validate(TrainSettings(epochs=np.int64(3), lr=np.float64(1e-3))).epochs == 3


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--epochs", 10), ("--batch-size", 64), ("--lr", 0.002), ("--clip-grad", 1.0),
                          ("--device", "cpu")):
        assert re.search(rf"{flag} \S+ .*?\(default: {default}\)", text), flag


def test_resume_refuses_new_settings_and_out_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "1", "--out", str(out)] + SMALL) == 0
    code, _, err = run_cli(capsys, "train", "--resume", out, "--lr", "0.1")
    assert code == 2
    assert_one_line_error(err, "drop --lr")
    code, _, err = run_cli(capsys, "train", "--epochs", "1", "--out", out, *SMALL)
    assert code == 2
    assert_one_line_error(err, "already holds a run")


def test_a_diverging_run_stops_and_names_the_step(tmp_path, capsys):
    code = cli.main(["train", "--epochs", "1", "--lr", "1e30", "--clip-grad", "0", "--out", str(tmp_path / "a")]
                    + SMALL)
    assert code == 1
    err = capsys.readouterr().err
    assert "the loss became nan at step" in err or "the loss became inf at step" in err
    code = cli.main(["train", "--epochs", "1", "--lr", "1e30", "--clip-grad", "0", "--anomaly",
                     "--out", str(tmp_path / "b")] + SMALL)
    assert code == 1
    assert "anomaly: " in capsys.readouterr().err


def test_missing_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MINIVIT_DATA", raising=False)
    offline = dataclasses.replace(data.DATASETS["mnist"], urls=("http://127.0.0.1:9/",))
    monkeypatch.setitem(data.DATASETS, "mnist", offline)
    code = cli.main(["train", "--preset", "mnist", "--epochs", "1", "--out", str(tmp_path / "r"), "--no-progress"])
    assert code == 1
    assert "mnist not found and could not be downloaded" in capsys.readouterr().err


def test_training_diverged_is_an_error_type():
    assert issubclass(TrainingDiverged, RuntimeError)


def test_a_time_budget_takes_the_most_epochs_whose_estimated_run_fits():
    within, share = train_module.epochs_within, train_module.BUDGET_SHARE
    # 10 s gone, 100 s an epoch, 10 s its evaluation, 50 s more at the end: 10 + 7 * 110 + 50 = 830 s
    costs = (100, 10, 50)
    assert train_module.estimated_seconds(10, 7, costs) == 830
    assert within(830 / share, 10, costs, most=20) == 7
    assert within(829 / share, 10, costs, most=20) == 6
    assert within(1e6, 10, costs, most=20) == 20              # --epochs is the most
    assert within(100, 10, costs, most=20) == 0               # not even one
    # after a first epoch of 120 s instead of 100 (started at 10 s): evaluations 1.2x too, 10 + 5 * 132 + 60 = 730
    assert train_module.costs_after_first(costs, 120) == pytest.approx((120, 12, 60))
    after = train_module.epochs_after_first
    assert after(830 / share, 130, 120, costs, most=20, least=1) == 5
    assert after(830 / share, 90, 80, costs, most=20, least=1) == 8    # 10 + 8 * 88 + 40
    assert after(100, 130, 120, costs, most=20, least=1) == 1          # the warmup is kept


def test_a_time_budget_run_is_the_run_of_the_epochs_it_measured_to_fit(tmp_path, capsys, monkeypatch):
    measure = train_module.measure_costs

    def measured_then_fixed(s, ds):
        measure(s, ds)                 # the real measurement runs (and must leave no trace in the run) ...
        return 20.0, 2.0, 5.0          # ... but the sizes are fixed: 60 s * 0.93 - spent - 5 fits 2 epochs of 22 s
    monkeypatch.setattr(train_module, "measure_costs", measured_then_fixed)
    flags = ["--ema", "0.9", "--augment", "--drop-rate", "0.2"] + SMALL
    assert cli.main(["train", "--minutes", "1", "--epochs", "3", "--out", str(tmp_path / "budget")] + flags) == 0
    printed = capsys.readouterr().out
    assert ("time budget 1 min: 20s to train an epoch, 2.0s to evaluate it, 5s more for the last evaluation" in printed
            and "2 epochs, about" in printed and "--minutes 0 --epochs 2 --warmup-epochs 1" in printed)
    # the first epoch really takes well under a second: planned again, 3 epochs fit (all that --epochs allows)
    assert re.search(r"planned again after the first epoch's \d+s of training \(measured beforehand: 20s\): 3 "
                      r"epochs instead of 2, about [\d.]+ min in all; the same run without the budget: --minutes 0 "
                      r"--epochs 3 --warmup-epochs 1", printed)
    assert cli.main(["train", "--epochs", "3", "--warmup-epochs", "1", "--out", str(tmp_path / "plain")] + flags) == 0
    budget = checkpoint.load_checkpoint(tmp_path / "budget" / "checkpoint.safetensors")
    plain = checkpoint.load_checkpoint(tmp_path / "plain" / "checkpoint.safetensors")
    assert budget.epoch == plain.epoch == 3
    assert (budget.train_settings["epochs"], budget.train_settings["minutes"]) == (3, 1.0)
    for k, v in plain.model_state.items():
        np.testing.assert_array_equal(budget.model_state[k], v, err_msg=k)
        np.testing.assert_array_equal(budget.ema_state[k], plain.ema_state[k], err_msg=k)
    assert [h["test_acc"] for h in budget.history] == [h["test_acc"] for h in plain.history]
    # a resumed budget run keeps its epochs (no new measurement) and extends like any other
    assert cli.main(["train", "--resume", str(tmp_path / "budget"), "--epochs", "4", "--no-progress"]) == 0
    assert "time budget" not in capsys.readouterr().out
    assert checkpoint.load_checkpoint(tmp_path / "budget" / "checkpoint.safetensors").epoch == 4
    # a warmup shorter than the first epoch: the decay has begun, so the first plan stands
    assert cli.main(["train", "--minutes", "1", "--epochs", "3", "--warmup-epochs", "0.5", "--out",
                     str(tmp_path / "short")] + flags) == 0
    assert "planned again" not in capsys.readouterr().out
    assert checkpoint.load_checkpoint(tmp_path / "short" / "checkpoint.safetensors").epoch == 2


def test_a_time_budget_too_small_for_one_epoch_is_a_clear_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--minutes", "0.001", "--out", tmp_path / "x", *SMALL)
    assert code == 2
    assert_one_line_error(err, "--minutes 0.001: not one epoch fits on this machine (")
    assert re.search(r"one epoch needs a budget of about \d+\.\d minutes$", err.strip())


def test_under_a_time_budget_epochs_is_the_most_and_the_warmup_stays():
    s = settings_for("fashion15")
    assert s.minutes == 15 and s.warmup_epochs == 1.0
    assert settings_for("fashion15", epochs=12).warmup_epochs == 1.0      # not scaled: 12 is only a bound
    assert settings_for("fashion", epochs=5).warmup_epochs == 0.5         # without a budget it is scaled
