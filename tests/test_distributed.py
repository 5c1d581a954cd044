"""Data-parallel training (minivit.distributed): N ranks make the step one process makes on the whole batch, a
failing rank ends the job, only rank 0 writes, and a run resumes exactly.

Each multi-rank test runs under both launchers: ``mpiexec`` (skipped when mpi4py or mpiexec is missing:
``pip install 'minivit[mpi]'``) and minivit's own processes joined by pipes (``python -m minivit.launch -n N`` for a
script, ``minivit train --processes N`` for the command), which need nothing beyond minivit.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minivit import checkpoint, distributed, train

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "mpi" / "train_steps.py"
LAUNCHERS = ["mpi", "local"]


def _mpiexec():
    pytest.importorskip("mpi4py", reason="needs mpi4py: pip install 'minivit[mpi]'")
    exe = shutil.which("mpiexec")
    if exe is None:
        pytest.skip("needs mpiexec: pip install 'minivit[mpi]'")
    return exe


def _command(args, ranks, launcher):
    """The command line that runs ``python args...`` as ``ranks`` ranks under ``launcher``."""
    args = [str(a) for a in args]
    if launcher == "mpi":
        return [_mpiexec(), "-n", str(ranks), sys.executable, *args]
    if args[:2] == ["-m", "minivit"]:
        return [sys.executable, *args, "--processes", str(ranks)]
    return [sys.executable, "-m", "minivit.launch", "-n", str(ranks), *args]


def _env():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("PMI_SIZE", distributed.RANK_VARIABLE):
        env.pop(name, None)
    return env


def _run(args, ranks, launcher="mpi", timeout=240):
    """``python args...`` as ``ranks`` ranks with this checkout's minivit; the CompletedProcess."""
    return subprocess.run(_command(args, ranks, launcher), env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _relative_difference(a, b):
    """The largest ||a - b|| / ||a|| over the tensors of two state dicts."""
    return max(float(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(a[k])) for k in a if np.linalg.norm(a[k]) > 0)


def test_shards_cover_the_batch_once_with_sizes_differing_by_at_most_one():
    for n, size in [(24, 2), (10, 3), (2, 4), (7, 1)]:
        parts = [distributed.shard(n, r, size) for r in range(size)]
        covered = np.concatenate([np.arange(n)[p] for p in parts])
        assert covered.tolist() == list(range(n))
        lengths = [p.stop - p.start for p in parts]
        assert max(lengths) - min(lengths) <= 1


def test_a_batch_too_small_to_give_every_rank_an_image_is_refused_before_the_run():
    s = train.settings_for("tiny", batch_size=32)
    train._check_split(s, 256, 2)
    train._check_split(s, 257, 1)
    with pytest.raises(train.SettingsError, match="leaves a batch of 1 image, too few to split among 2 ranks"):
        train._check_split(s, 257, 2)
    with pytest.raises(train.SettingsError, match="batch of 32 images, too few to split among 40 ranks"):
        train._check_split(s, 256, 40)


def test_one_process_is_a_world_of_one_that_does_not_communicate():
    world = distributed.SingleProcess()
    assert (world.rank, world.size, world.is_main) == (0, 1, True)
    assert world.broadcast({"a": 1}) == {"a": 1} and world.sum([1, 2.5]) == [1, 2.5]


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("dtype, optimizer, tolerance", [("float64", "adamw", 1e-12), ("float32", "sgd", 1e-5)])
def test_two_ranks_reach_the_weights_of_one_rank_on_the_same_global_batches(tmp_path, dtype, optimizer, tolerance,
                                                                            launcher):
    # float32 with AdamW is left out on purpose: some gradients are zero in exact arithmetic (the bias of the keys:
    # softmax ignores a shift of a row), so their float32 values are rounding noise that Adam scales up to steps
    # of size lr, and the ranks' different summation order moves the weights by about 4e-4.
    weights = {}
    for ranks in (1, 2):
        out = tmp_path / f"{ranks}.npz"
        done = _run([SCRIPT, out, "--dtype", dtype, "--optimizer", optimizer, "--steps", "4", "--batch", "24"], ranks,
                    launcher)
        assert done.returncode == 0, done.stderr
        weights[ranks] = dict(np.load(out))
    assert _relative_difference(weights[1], weights[2]) <= tolerance
    # ...and the steps did move the weights (rank 1 starts from other weights, so this also checks the broadcast)
    start = tmp_path / "start.npz"
    assert _run([SCRIPT, start, "--dtype", dtype, "--steps", "0"], 1, launcher).returncode == 0
    assert _relative_difference(dict(np.load(start)), weights[2]) > 1e-3


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_failing_rank_ends_the_whole_job_with_its_error(tmp_path, launcher):
    t0 = time.perf_counter()
    done = _run([SCRIPT, tmp_path / "never.npz", "--steps", "5", "--fail-rank", "1"], 2, launcher, timeout=120)
    assert time.perf_counter() - t0 < 120
    assert done.returncode != 0
    assert "rank 1 failed on purpose" in done.stdout + done.stderr
    assert not (tmp_path / "never.npz").exists()


def _train(out, ranks, launcher, *flags):
    # a constant learning rate, so that a run of 1 epoch extended to 2 follows the schedule of a run of 2
    done = _run(["-m", "minivit", "train", "--epochs", "2", "--limit", "256", "--batch-size", "32", "--lr", "2e-3",
                 "--min-lr", "2e-3", "--warmup-epochs", "0", "--no-progress", "--out", out, *flags], ranks, launcher)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_minivit_train_on_two_ranks_writes_once_and_resumes_exactly(tmp_path, launcher):
    whole = _train(tmp_path / "whole", 2, launcher)
    assert whole.stdout.count("test accuracy") == 1  # only rank 0 logs
    assert "each batch shared by 2 processes" in whole.stdout
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ranks"] for r in rows] == [2, 2] and all(r["comm_time_s"] >= 0 for r in rows)
    _train(tmp_path / "halves", 2, launcher, "--epochs", "1")
    resume = ["-m", "minivit", "train", "--resume", tmp_path / "halves", "--epochs", "2", "--no-progress"]
    # minivit's own launcher: a resumed run goes on in the processes it ran in, without being told again
    done = _run(resume, 2) if launcher == "mpi" else subprocess.run(
        [sys.executable, *map(str, resume)], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "each batch shared by 2 processes" in done.stdout
    a = checkpoint.load_checkpoint(tmp_path / "whole" / "checkpoint.safetensors").model_state
    b = checkpoint.load_checkpoint(tmp_path / "halves" / "checkpoint.safetensors").model_state
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_ranks_evaluating_their_shares_of_a_set_give_the_loss_and_accuracy_of_the_whole(tmp_path, launcher):
    out = tmp_path / "eval.json"
    done = _run([ROOT / "tests" / "mpi" / "evaluate_shards.py", out], 2, launcher, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["ranks"] == 2
    (loss, acc), (whole_loss, whole_acc) = result["shared"], result["whole"]
    assert acc == whole_acc and abs(loss - whole_loss) <= 1e-6 * whole_loss
    (loss, acc), (whole_loss, whole_acc) = result["one_shared"], result["one_whole"]
    assert acc == whole_acc and abs(loss - whole_loss) <= 1e-6 * whole_loss


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_minivit_train_reports_a_bad_flag_once_per_rank_and_ends(tmp_path, launcher):
    done = _run(["-m", "minivit", "train", "--epochs", "0", "--out", tmp_path / "bad"], 2, launcher, timeout=120)
    assert done.returncode != 0 and "--epochs 0 is out of range" in done.stderr


def _processes_running(marker):
    """Process ids whose command line contains ``marker`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def _start_long_run(out, launcher):
    """A 50-epoch run on two ranks, returned once its first checkpoint is written."""
    args = ["-m", "minivit", "train", "--epochs", "50", "--limit", "256", "--batch-size", "32", "--no-progress",
            "--out", out]
    job = subprocess.Popen(_command(args, 2, launcher), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (out / checkpoint.CHECKPOINT_NAME).exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    if not (out / checkpoint.CHECKPOINT_NAME).exists():
        job.kill()
        pytest.fail(f"the first epoch did not finish: {job.communicate()[1]}")
    return job


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_ctrl_c_ends_every_rank_and_leaves_a_readable_checkpoint(tmp_path, launcher):
    out = tmp_path / "run"
    job = _start_long_run(out, launcher)
    try:
        job.send_signal(signal.SIGINT)  # mpiexec passes it on to every rank; minivit's rank 0 ends the others
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0 and "interrupted" in err
    assert checkpoint.load_checkpoint(out / checkpoint.CHECKPOINT_NAME).epoch >= 1
    deadline = time.time() + 30
    while _processes_running(str(out)) and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_running(str(out)) == []


@pytest.mark.parametrize("rank, wait", [(0, distributed.ABORT_PAUSE_S), (1, distributed.ABORT_GRACE_S)])
def test_an_mpi_rank_ends_the_job_only_after_its_words_have_left_and_rank_0_had_its_turn(monkeypatch, rank, wait):
    # MPI_Abort ends every process at once: what a rank printed but the launcher had not yet read is lost, and a
    # rank other than 0 that aborts first loses rank 0's report of what the run saved (seen as an empty stderr)
    events = []

    class Comm:
        def Abort(self, code):
            events.append(("abort", code))
    group = object.__new__(distributed.MPIGroup)
    group.rank, group.comm = rank, Comm()
    monkeypatch.setattr(distributed.time, "sleep", lambda seconds: events.append(("sleep", seconds)))
    group.abort(130)
    assert events == [("sleep", wait), ("abort", 130)]
    assert 0 < distributed.ABORT_PAUSE_S < distributed.ABORT_GRACE_S

    def interrupted(seconds):                  # a second Ctrl-C during the wait ends the job at once
        raise KeyboardInterrupt
    monkeypatch.setattr(distributed.time, "sleep", interrupted)
    events.clear()
    group.abort(130)
    assert events == [("abort", 130)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe sizes are set on Linux only")
def test_the_pipes_between_ranks_hold_a_whole_small_gradient():
    import fcntl
    if distributed.PIPE_BYTES > int(Path("/proc/sys/fs/pipe-max-size").read_text()) and os.geteuid() != 0:
        pytest.skip("this system allows smaller pipes")
    group = distributed.start_processes(2, ["-c", "pass"])     # a rank that ends at once, without joining
    try:
        for fd in group.links[1]:                               # rank 0's ends: from rank 1, and to it
            assert fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) >= distributed.PIPE_BYTES
    finally:
        group.abort(1)


def test_a_started_rank_keeps_its_place_to_itself(monkeypatch):
    # what start_processes hands a rank must not reach processes that the rank starts in turn
    read_fd, write_fd = os.pipe()
    os.set_inheritable(read_fd, True)
    monkeypatch.setenv(distributed.RANK_VARIABLE, "1")
    monkeypatch.setenv(distributed.SIZE_VARIABLE, "2")
    monkeypatch.setenv(distributed.PIPES_VARIABLE, f"{read_fd},{write_fd}")
    group = distributed.LocalGroup.joined()
    try:
        assert (group.rank, group.size, group.links) == (1, 2, {0: (read_fd, write_fd)})
        assert not {distributed.RANK_VARIABLE, distributed.SIZE_VARIABLE, distributed.PIPES_VARIABLE} & set(os.environ)
        assert not os.get_inheritable(read_fd) and not os.get_inheritable(write_fd)
    finally:
        group._close()


def test_the_launcher_refuses_a_count_of_no_processes_and_runs_one_process_without_starting_others(tmp_path):
    done = subprocess.run([sys.executable, "-m", "minivit.launch", "-n", "0", SCRIPT, tmp_path / "x.npz"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "-n 0: at least 1 process" in done.stderr
    done = _run([SCRIPT, tmp_path / "one.npz", "--steps", "1"], 1, "local", timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "one.npz").exists()


def test_the_other_ranks_end_when_rank_0_is_killed_outright(tmp_path):
    out = tmp_path / "run"
    job = _start_long_run(out, "local")
    others = [pid for pid in _processes_running(str(out)) if pid != job.pid]
    assert len(others) == 1
    job.kill()  # SIGKILL: rank 0 cannot tell anyone; its pipes close with it
    job.communicate(timeout=60)
    deadline = time.time() + 60
    while _processes_running(str(out)) and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_running(str(out)) == []


def test_the_allreduce_script_of_lesson_27_gives_two_ranks_the_gradient_of_the_whole_batch():
    done = _run([ROOT / "lessons" / "27_allreduce.py"], 2, timeout=120)  # it calls mpi4py itself, as a lesson
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank 0 of 2: images 0-5 (6 of 11)" in done.stdout and "rank 1 of 2: images 6-10 (5 of 11)" in done.stdout
    assert "equal to rounding" in done.stdout
