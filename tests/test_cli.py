"""The command line under bad input and faults (issue 18): one-line errors, exit codes, nothing silently wrong,
nothing lost. The tests are named after the issue's numbered items."""

import dataclasses
import errno
import shutil
import sys

import numpy as np
import pytest

from minivit import checkpoint, cli, data, devices, train
from minivit.rundir import RunFolder
from tests.test_data import write_idx_pair

SMALL = ["--limit", "200", "--embed-dim", "8", "--depth", "1", "--num-heads", "2", "--batch-size", "50",
         "--no-progress"]


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of ``minivit argv...`` run in this process."""
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err, message):
    assert err.startswith("minivit: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and message in err, err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-epoch run, trained once; tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", "--epochs", "2", "--out", str(out)] + SMALL) == 0
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    return shutil.copytree(finished_run, tmp_path / "run")


def test_item1_negative_clip_and_min_lr_are_refused_before_training(capsys, tmp_path):
    for flags, message in ((["--clip-grad", "-1"], "--clip-grad -1.0 is out of range: expected >= 0"),
                           (["--min-lr", "-0.01"], "--min-lr -0.01 is out of range: expected >= 0"),
                           (["--min-lr", "0.01", "--lr", "0.002"], "--min-lr 0.01 is above --lr 0.002")):
        code, out, err = run_cli(capsys, "train", "--epochs", "2", "--out", tmp_path / "r", *flags, *SMALL)
        assert code == 2 and out == ""
        assert_one_line_error(err, message)
        assert not (tmp_path / "r").exists()


def test_item2_a_second_run_on_a_busy_folder_stops_at_once(capsys, tmp_path):
    out = tmp_path / "busy"
    with RunFolder(out, log=lambda m: None):  # the first run, still working
        code, _, err = run_cli(capsys, "train", "--epochs", "1", "--out", out, *SMALL)
        assert code == 1
        assert_one_line_error(err, f"{out} is in use by process ")
        assert f"lock file {out / 'run.lock'}" in err
        assert not (out / checkpoint.CHECKPOINT_NAME).exists()
    assert not out.exists()  # the first run ended without writing anything: no empty folder stays


def test_item2_a_stale_lock_of_a_dead_process_is_reported_and_taken_over(capsys, tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    (out / "run.lock").write_text("process 4194999 on host elsewhere\n")  # nobody holds it
    code, printed, _ = run_cli(capsys, "train", "--epochs", "1", "--out", out, *SMALL)
    assert code == 0
    assert "process 4194999 on host elsewhere is no longer running; taking over its stale lock" in printed
    assert not (out / "run.lock").exists()


def test_item3_export_never_writes_over_the_checkpoint_or_an_existing_file(capsys, run, tmp_path):
    ckpt = run / checkpoint.CHECKPOINT_NAME
    before = ckpt.read_bytes()
    for force in ([], ["--force"]):
        code, _, err = run_cli(capsys, "export", run, ckpt, *force)
        assert code == 2
        assert_one_line_error(err, "is the checkpoint being exported")
    assert ckpt.read_bytes() == before
    other = tmp_path / "weights.safetensors"
    other.write_bytes(b"keep me")
    code, _, err = run_cli(capsys, "export", run, other)
    assert code == 2
    assert_one_line_error(err, f"{other} already exists; choose another file name, or pass --force")
    assert other.read_bytes() == b"keep me"
    assert run_cli(capsys, "export", run, other, "--force")[0] == 0
    assert "head.weight" in checkpoint.read_state_dict(other)


def test_item4_flipped_bytes_in_a_checkpoint_are_an_error_not_wrong_weights(capsys, run, tmp_path):
    ckpt = run / checkpoint.CHECKPOINT_NAME
    raw = bytearray(ckpt.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    rng = np.random.default_rng(4)
    for i in rng.choice(np.arange(header, len(raw)), 200, replace=False):
        raw[i] ^= 0xFF
    ckpt.write_bytes(bytes(raw))
    for command in (["eval", run], ["export", run, tmp_path / "w.safetensors"], ["train", "--resume", run,
                                                                                 "--epochs", "3"]):
        code, _, err = run_cli(capsys, *command)
        assert code == 1
        assert_one_line_error(err, f"{ckpt}: damaged: its contents no longer match the SHA-256")
    assert not (tmp_path / "w.safetensors").exists()


def test_item5_bad_labels_stop_before_training(capsys, tmp_path):
    folder = write_idx_pair(tmp_path / "data" / "fashion-mnist")
    data.write_idx(folder / "train-labels-idx1-ubyte.gz", [0, 1, -3, 2] * 5, np.int8)
    code, out, err = run_cli(capsys, "train", "--preset", "fashion", "--epochs", "1", "--data-dir", tmp_path / "data",
                             "--no-verify", "--out", tmp_path / "r", "--no-progress")
    assert code == 1 and "epoch" not in out.replace("1 epoch of", "")
    assert_one_line_error(err, "labels must be 0..9 for 10 classes, got -3..2")
    assert not (tmp_path / "r").exists()


def test_item6_mnist_files_that_are_not_mnist_are_refused(capsys, tmp_path, monkeypatch):
    write_idx_pair(tmp_path / "data")  # files with MNIST's names, but not MNIST's contents
    monkeypatch.setenv("MINIVIT_DATA", str(tmp_path / "data"))
    code, _, err = run_cli(capsys, "train", "--preset", "mnist", "--epochs", "1", "--out", tmp_path / "r",
                           "--no-progress")
    assert code == 1
    assert_one_line_error(err, "train-images-idx3-ubyte.gz: not the published mnist file (its SHA-256 differs)")
    assert "--no-verify" in err


def test_item7_a_data_dir_that_does_not_exist_is_an_error(capsys, tmp_path, monkeypatch):
    write_idx_pair(tmp_path / "elsewhere")
    monkeypatch.setenv("MINIVIT_DATA", str(tmp_path / "elsewhere"))  # the next place in the lookup order
    code, _, err = run_cli(capsys, "train", "--preset", "mnist", "--no-verify", "--data-dir", tmp_path / "typo",
                           "--out", tmp_path / "r", "--no-progress")
    assert code == 1
    assert_one_line_error(err, f"the data folder {tmp_path / 'typo'} does not exist (--data-dir)")
    assert not (tmp_path / "r").exists()


def interrupt_at_evaluation(monkeypatch, call):
    """Make the ``call``-th evaluation (1: at the end of epoch 1) raise KeyboardInterrupt, as Ctrl-C would."""
    calls = []
    original = train.evaluate

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(train, "evaluate", evaluate)


def test_item8_ctrl_c_in_the_first_epoch_says_nothing_is_saved(capsys, tmp_path, monkeypatch):
    interrupt_at_evaluation(monkeypatch, 1)
    out = tmp_path / "r"
    code, printed, err = run_cli(capsys, "train", "--epochs", "3", "--out", out, *SMALL)
    assert code == 130
    assert printed.startswith(f"run folder: {out}\n")
    assert "nothing was saved" in err and "<out folder>" not in err and "--resume" not in err
    assert not out.exists()


def test_item8_ctrl_c_later_names_the_saved_epoch_and_the_real_folder(capsys, tmp_path, monkeypatch):
    interrupt_at_evaluation(monkeypatch, 3)
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, "train", "--epochs", "3", "--out", out, *SMALL)
    assert code == 130
    assert f"{out / checkpoint.CHECKPOINT_NAME} holds epoch 2 of 3: continue with  minivit train --resume {out}" in err
    assert checkpoint.load_checkpoint(out / checkpoint.CHECKPOINT_NAME).epoch == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors", "curves.png", "metrics.jsonl"]


def test_item9_a_short_cifar10_run_is_accepted_with_its_warmup_scaled(capsys, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(cli, "train", lambda settings, out, **kwargs: started.append(settings))
    code, _, err = run_cli(capsys, "train", "--preset", "cifar10", "--epochs", "1", "--out", tmp_path / "r")
    assert code == 0 and err == ""
    assert started[0].epochs == 1 and started[0].warmup_epochs == pytest.approx(0.1)  # 5 of 50 epochs


def test_item10_faults_at_run_time_are_one_line_errors_with_exit_code_1(capsys, run, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    code, _, err = run_cli(capsys, "train", "--epochs", "1", "--out", tmp_path / "a-file" / "r", *SMALL)
    assert code == 1
    assert_one_line_error(err, f"{tmp_path / 'a-file' / 'r'}: Not a directory")

    def disk_full(tensors, tmp, metadata=None):
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", tmp)
    monkeypatch.setattr("safetensors.numpy.save_file", disk_full)
    code, _, err = run_cli(capsys, "train", "--epochs", "1", "--out", tmp_path / "full", *SMALL)
    assert code == 1
    assert_one_line_error(err, f"{tmp_path / 'full' / 'checkpoint.safetensors'}: No space left on device")
    assert not (tmp_path / "full").exists()


def test_item10_a_checkpoint_whose_config_does_not_fit_its_tensors(capsys, run):
    tensors, meta = checkpoint.load_tensors(run / checkpoint.CHECKPOINT_NAME)
    meta["config"] = meta["config"].replace('"embed_dim": 8', '"embed_dim": 12')
    assert '"embed_dim": 12' in meta["config"]
    checkpoint.save_tensors(run / checkpoint.CHECKPOINT_NAME, tensors, meta)
    code, _, err = run_cli(capsys, "eval", run)
    assert code == 1
    assert_one_line_error(err, "its config does not fit its tensors")


@pytest.mark.skipif(devices.cuda_available(), reason="this machine has a usable GPU")
def test_item10_device_cuda_without_cupy(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--device", "cuda", "--out", tmp_path / "r", *SMALL)
    assert code == 2
    assert_one_line_error(err, "--device cuda needs CuPy and a CUDA device")


def test_item10_debug_shows_the_traceback(capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(NotADirectoryError):
        cli.main(["train", "--debug", "--epochs", "1", "--out", str(tmp_path / "a-file" / "r")] + SMALL)


def test_item11_a_failed_start_leaves_no_folders(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MINIVIT_DATA", raising=False)
    offline = dataclasses.replace(data.DATASETS["mnist"], urls=("http://127.0.0.1:9/",))
    monkeypatch.setitem(data.DATASETS, "mnist", offline)
    (tmp_path / "data").mkdir()
    code, _, err = run_cli(capsys, "train", "--preset", "mnist", "--data-dir", tmp_path / "data",
                           "--out", tmp_path / "runs" / "r", "--no-progress")
    assert code == 1
    assert_one_line_error(err, "mnist not found and could not be downloaded")
    assert list((tmp_path / "data").iterdir()) == [] and not (tmp_path / "runs").exists()


def test_item12_a_finished_run_is_extended_with_resume_and_epochs(capsys, run):
    code, _, err = run_cli(capsys, "train", "--resume", run, "--no-progress")
    assert code == 2
    assert_one_line_error(err, "has finished all 2 epochs; extend it with --epochs N (N > 2)")
    code, _, err = run_cli(capsys, "train", "--resume", run, "--epochs", "2", "--no-progress")
    assert code == 2
    assert_one_line_error(err, "already holds 2 epochs; to extend the run, ask for more than 2")
    before = checkpoint.load_checkpoint(run / checkpoint.CHECKPOINT_NAME)
    code, printed, _ = run_cli(capsys, "train", "--resume", run, "--epochs", "3", "--no-progress")
    assert code == 0 and "resuming" in printed and "epoch   3/3" in printed
    after = checkpoint.load_checkpoint(run / checkpoint.CHECKPOINT_NAME)
    assert after.epoch == 3 and after.train_settings["epochs"] == 3 and len(after.history) == 3
    assert after.history[:2] == before.history
    steps = before.schedule_state["last_step"] // 2
    assert after.schedule_state["total_steps"] == 3 * steps  # the cosine stretched to the new end
    assert after.history[2]["lr"] == pytest.approx(after.train_settings["min_lr"])  # and it ends where it should
    assert before.history[1]["lr"] == pytest.approx(before.train_settings["min_lr"])


def test_resume_into_another_folder_never_replaces_the_run_it_holds(capsys, run, tmp_path):
    other = shutil.copytree(run, tmp_path / "other")
    before = (other / checkpoint.CHECKPOINT_NAME).read_bytes()
    code, _, err = run_cli(capsys, "train", "--resume", run, "--epochs", "3", "--out", other)
    assert code == 2
    assert_one_line_error(err, f"{other} already holds a run")
    assert (other / checkpoint.CHECKPOINT_NAME).read_bytes() == before


def test_a_run_on_your_own_data_stays_unverified_when_resumed_and_evaluated(capsys, tmp_path):
    write_idx_pair(tmp_path / "data" / "fashion-mnist", n=50)
    out = tmp_path / "r"
    flags = ["--preset", "fashion", "--data-dir", tmp_path / "data", "--embed-dim", "8", "--depth", "1",
             "--num-heads", "2", "--batch-size", "25", "--no-progress"]
    code, _, err = run_cli(capsys, "train", "--epochs", "1", "--out", out, *flags)
    assert code == 1 and "not the published fashion-mnist file" in err
    assert run_cli(capsys, "train", "--epochs", "1", "--out", out, "--no-verify", *flags)[0] == 0
    assert run_cli(capsys, "train", "--resume", out, "--epochs", "2", "--no-progress")[0] == 0
    assert run_cli(capsys, "eval", out)[0] == 0


def test_item12_an_export_records_its_config_and_can_be_evaluated(capsys, run, tmp_path):
    exported = tmp_path / "vit.safetensors"
    assert run_cli(capsys, "export", run, exported)[0] == 0
    code, printed, _ = run_cli(capsys, "eval", exported, "--out", tmp_path / "pictures")
    assert code == 0
    accuracy = checkpoint.load_checkpoint(run / checkpoint.CHECKPOINT_NAME).history[-1]["test_acc"]
    assert f"accuracy {accuracy:.2%}" in printed
    code, _, err = run_cli(capsys, "train", "--resume", exported, "--epochs", "3")
    assert code == 1
    assert_one_line_error(err, "exported weights, not a training checkpoint")


def test_item12_one_epoch_is_not_one_epochs(capsys, tmp_path):
    code, printed, _ = run_cli(capsys, "train", "--epochs", "1", "--limit", "50", "--batch-size", "50",
                               "--embed-dim", "8", "--depth", "1", "--num-heads", "2", "--no-progress",
                               "--out", tmp_path / "r")
    assert code == 0
    assert "1 epoch of 1 step on cpu" in printed and "after 1 epoch (" in printed
    assert "1 epochs" not in printed and "1 steps" not in printed


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
