"""Run folders: one owner at a time, stale locks taken over and reported, killed writes cleaned up, and no empty
folders left by a run that wrote nothing."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from minivit import checkpoint
from minivit.rundir import LOCK_NAME, RunFolder, RunLocked


def test_the_lock_names_its_owner_and_keeps_a_second_owner_out(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out, log=lambda m: None):
        owner = (out / LOCK_NAME).read_text()
        assert owner.startswith(f"process {os.getpid()} on host ")
        with pytest.raises(RunLocked, match=f"{out} is in use by process {os.getpid()} on host"):
            with RunFolder(out, log=lambda m: None):
                pass
        assert (out / LOCK_NAME).read_text() == owner  # the refused second owner changed nothing
    assert not out.exists()  # nothing was written: the folder this run created is gone


def test_a_lock_left_by_a_killed_process_is_stale_and_reported(tmp_path):
    out = tmp_path / "run"
    code = ("import os, signal, sys; from minivit.rundir import RunFolder; f = RunFolder(sys.argv[1]).__enter__(); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    root = Path(__file__).parents[1]  # this checkout's minivit, not an installed one
    child = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=root,
                             env={**os.environ, "PYTHONPATH": str(root)})
    assert child.wait() == -signal.SIGKILL
    left = (out / LOCK_NAME).read_text().strip()
    assert left.startswith(f"process {child.pid} on host ")
    messages = []
    with RunFolder(out, log=messages.append):
        assert messages == [f"{out / LOCK_NAME}: {left} is no longer running; taking over its stale lock"]
    assert list(out.iterdir()) == []  # the lock is gone; the folder stays, as this run did not create it


def test_temporary_files_of_killed_writers_are_removed_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = out / ".checkpoint.safetensors.4194999.0123abcd.tmp"  # pid 4194999: no such process
    alive = out / f".metrics.jsonl.{os.getpid()}.0123abcd.tmp"    # a writer still at work
    other = out / ".notes.tmp"                                   # not ours
    for path in (dead, alive, other):
        path.write_bytes(b"x" * 1000)
    messages = []
    with RunFolder(out, log=messages.append):
        assert not dead.exists() and alive.exists() and other.exists()
    assert messages == [f"removed {dead}, left by a write that was interrupted"]
    assert checkpoint.remove_stale_temporaries(out) == []


def test_a_folder_that_existed_is_kept_and_only_created_parents_are_removed(tmp_path):
    (tmp_path / "kept").mkdir()
    with RunFolder(tmp_path / "kept", log=lambda m: None):
        pass
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []
    with RunFolder(tmp_path / "a" / "b" / "c", log=lambda m: None) as run:
        (run.path / "checkpoint.safetensors").write_bytes(b"x")
    assert (tmp_path / "a" / "b" / "c" / "checkpoint.safetensors").exists()
    assert not (tmp_path / "a" / "b" / "c" / LOCK_NAME).exists()
