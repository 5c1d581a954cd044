"""Fault injection: a small training killed at random moments, and inside its checkpoint writes, never loses or
damages what it saved.

After every kill the run folder holds either nothing or a checkpoint that loads and passes its checksum; the next
start removes the temporary files of killed writes and takes over the stale lock; and the run, resumed after all
its kills, ends with exactly the weights of a run that was never interrupted.
"""

import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from minivit import checkpoint
from minivit.rundir import LOCK_NAME, RunFolder

ROOT = Path(__file__).parents[1]
EPOCHS = 5
FLAGS = ["--limit", "200", "--embed-dim", "8", "--depth", "1", "--num-heads", "2", "--batch-size", "50",
         "--drop-rate", "0.1", "--no-progress"]
KILLS = 24

# Runs minivit, killing itself inside its K-th checkpoint write: with half of the temporary file written ("mid"),
# or with the whole file written but not yet renamed ("rename").
KILLED_IN_WRITE = """
import os, signal, sys
import safetensors.numpy
from minivit import cli

where, k = sys.argv[1], int(sys.argv[2])
writes, save_file, replace = [], safetensors.numpy.save_file, os.replace

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def save_then_die(tensors, tmp, metadata=None):
    save_file(tensors, tmp, metadata=metadata)
    writes.append(tmp)
    if where == "mid" and len(writes) == k:
        os.truncate(tmp, os.path.getsize(tmp) // 2)
        die()

def replace_or_die(src, dst):
    if where == "rename" and str(dst).endswith("checkpoint.safetensors") and len(writes) == k:
        die()
    replace(src, dst)

safetensors.numpy.save_file, os.replace = save_then_die, replace_or_die
sys.exit(cli.main(sys.argv[3:]))
"""


def start(argv, killed_in_write=None):
    """Start ``minivit argv`` from this checkout, optionally set to die inside a checkpoint write."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    code = ["-m", "minivit"] if killed_in_write is None else ["-c", KILLED_IN_WRITE, *map(str, killed_in_write)]
    return subprocess.Popen([sys.executable, *code, *map(str, argv)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def temporaries(folder):
    return sorted(p.name for p in folder.glob(".*.tmp")) if folder.exists() else []


def check_folder(out):
    """Nothing, or a checkpoint that loads (checksum included) with metrics no further than it; its epoch or 0."""
    files = {p.name for p in out.iterdir()} if out.exists() else set()
    kept = files - {LOCK_NAME} - set(temporaries(out))
    if checkpoint.CHECKPOINT_NAME not in kept:
        assert kept == set(), f"{out} holds {kept} but no checkpoint"
        return 0
    assert kept <= {checkpoint.CHECKPOINT_NAME, "metrics.jsonl", "curves.png"}, kept
    saved = checkpoint.load_checkpoint(out / checkpoint.CHECKPOINT_NAME)
    assert 1 <= saved.epoch <= EPOCHS and len(saved.history) == saved.epoch
    if "metrics.jsonl" in kept:
        assert len((out / "metrics.jsonl").read_text().splitlines()) in (saved.epoch - 1, saved.epoch)
    return saved.epoch


def test_random_kills_never_lose_or_damage_a_checkpoint_and_resume_exactly(tmp_path):
    reference = tmp_path / "reference"
    assert start(["train", "--epochs", EPOCHS, "--out", reference, *FLAGS]).wait() == 0
    expected = checkpoint.load_checkpoint(reference / checkpoint.CHECKPOINT_NAME)

    rng = random.Random(18)
    kills = in_write = chains = 0
    out, left_behind = tmp_path / "run0", []
    while kills < KILLS:
        epoch = check_folder(out)
        if epoch == EPOCHS:  # this run is complete: check it, then start another one
            finish_and_compare(out, expected)
            chains += 1
            out, left_behind = tmp_path / f"run{chains}", []
            continue
        argv = ["train", "--resume", out, "--no-progress"] if epoch else \
            ["train", "--epochs", EPOCHS, "--out", out, *FLAGS]
        if kills % 3 == 0:  # inside the first or second checkpoint write of this process
            child = start(argv, killed_in_write=(rng.choice(["mid", "rename"]), rng.randint(1, 2)))
            output = child.communicate(timeout=120)[0]
        else:               # at a random moment, by a random signal
            child = start(argv)
            try:
                output = child.communicate(timeout=rng.uniform(0.3, 3.5))[0]
            except subprocess.TimeoutExpired:
                child.send_signal(rng.choice([signal.SIGKILL, signal.SIGTERM, signal.SIGINT]))
                output = child.communicate(timeout=120)[0]
        if "run folder:" in output:  # the start got as far as the run folder: it cleaned what was left there
            assert not set(left_behind) & set(temporaries(out)), (left_behind, output)
        if child.returncode != 0:
            kills += 1
            in_write += child.args[1] == "-c" and child.returncode == -signal.SIGKILL
        if child.returncode == 130:  # stopped cleanly (Ctrl-C or SIGTERM): it says what is saved, removes its lock
            assert "minivit: interrupted; " in output and "Traceback" not in output, output
            lock = (out / LOCK_NAME).read_text() if (out / LOCK_NAME).exists() else ""
            assert f"process {child.pid} " not in lock, output
            assert not [name for name in temporaries(out) if f".{child.pid}." in name], output
            if "run folder:" in output:  # it owned the folder: what killed runs left is gone too
                assert lock == "" and temporaries(out) == [], output
            said = re.search(r"holds epoch (\d+) of|holds all (\d+) epochs|(nothing was saved)", output)
            if said:  # (a signal during the start names nothing)
                assert check_folder(out) == int(said[1] or said[2] or 0), output
        left_behind = temporaries(out)
    finish_and_compare(out, expected)
    assert kills >= 20 and in_write >= 5, (kills, in_write)


def finish_and_compare(out, expected):
    """Resume ``out`` to its end (if needed); its checkpoint must equal the uninterrupted run's, bit for bit."""
    epoch = check_folder(out)
    argv = ["train", "--resume", out, "--no-progress"] if epoch else ["train", "--epochs", EPOCHS, "--out", out, *FLAGS]
    if epoch < EPOCHS:
        child = start(argv)
        output = child.communicate(timeout=120)[0]
        assert child.returncode == 0, output
    else:  # complete already; a run killed after its last checkpoint may have left a temporary: the next start
        with RunFolder(out, log=lambda message: None):   # of anything in this folder removes it
            pass
    assert temporaries(out) == [] and not (out / LOCK_NAME).exists()
    resumed = checkpoint.load_checkpoint(out / checkpoint.CHECKPOINT_NAME)
    for name, value in expected.model_state.items():
        np.testing.assert_array_equal(resumed.model_state[name], value, err_msg=name)
    for i, state in expected.optimizer_state["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(resumed.optimizer_state["state"][i][name], state[name])
    assert [h["test_acc"] for h in resumed.history] == [h["test_acc"] for h in expected.history]
    assert resumed.rng_state == expected.rng_state


def test_two_runs_on_one_folder_the_second_stops_at_once(tmp_path):
    out = tmp_path / "run"
    first = start(["train", "--epochs", 50, "--out", out, *FLAGS])
    assert first.stdout.readline() == f"run folder: {out}\n"  # it holds the lock from here on
    second = start(["train", "--epochs", 1, "--out", out, *FLAGS])
    output = second.communicate(timeout=120)[0]
    assert second.returncode == 1
    assert output.startswith(f"minivit: error: {out} is in use by process {first.pid} on host "), output
    first.send_signal(signal.SIGTERM)
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 130 and "minivit: interrupted; " in output, output
    epoch = check_folder(out)
    assert epoch < 50 and ("nothing was saved" in output if epoch == 0 else f"holds epoch {epoch} of 50" in output)
