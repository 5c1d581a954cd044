"""docs/errors.md: what each bad input and fault gets from the command line, produced by running each one.

The test runs every case below and compares the table with docs/errors.md, so the documented messages are the
real ones. After changing a message, rewrite the file with
    MINIVIT_WRITE_DOCS=1 python -m pytest tests/test_errors_table.py
"""

import dataclasses
import errno
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from minivit import checkpoint, cli, data
from minivit.rundir import RunFolder
from tests.test_cli import interrupt_at_evaluation
from tests.test_data import write_idx_pair

DOC = Path(__file__).parents[1] / "docs" / "errors.md"
SMALL = ["--limit", "200", "--embed-dim", "8", "--depth", "1", "--num-heads", "2", "--batch-size", "50",
         "--no-progress"]
HEADER = """# What each bad input and fault gets

Every failure of `minivit train`, `eval` and `export` ends in one line on stderr, `minivit: error: ...`, naming
the flag, the value and what is allowed (or the file and what is wrong with it), and an exit code:

- **2**: the command line cannot run as given (a flag out of range, flags that contradict each other, a file that
  must not be overwritten, a run that is finished or in use); nothing was started.
- **1**: a fault at run time (missing, foreign or corrupt data, a damaged checkpoint, a full or read-only disk, a
  diverged run, a folder locked by another run).
- **130**: interrupted by Ctrl-C or `kill` (SIGTERM); the message says what is saved.

No traceback is shown unless `--debug` is given. A few situations are not errors but are reported on stdout: a
stale lock left by a killed run, and temporary files left by a write that was killed (both removed at the next
start). `--device cuda` on a machine without CuPy and a GPU gets `--device cuda needs CuPy and a CUDA device,
...` (exit 2).

The table is produced by running each case (`tests/test_errors_table.py` checks that it is up to date). `run`
is a finished two-epoch run of the tiny preset; `data/` a folder of files with MNIST's names.

| input or fault | command | exit | what minivit says |
| --- | --- | --- | --- |
"""


def finished(tmp, run):
    shutil.copytree(run, tmp / "run")


def damaged(tmp, run):
    finished(tmp, run)
    path = tmp / "run" / checkpoint.CHECKPOINT_NAME
    raw = bytearray(path.read_bytes())
    raw[-200:] = bytes(b ^ 0xFF for b in raw[-200:])
    path.write_bytes(bytes(raw))


def wrong_config(tmp, run):
    finished(tmp, run)
    path = tmp / "run" / checkpoint.CHECKPOINT_NAME
    tensors, meta = checkpoint.load_tensors(path)
    checkpoint.save_tensors(path, tensors, {**meta, "config": meta["config"].replace('"num_classes": 10',
                                                                                     '"num_classes": 5')})


def mnist_names(tmp, run, labels=None):
    write_idx_pair(tmp / "data")
    if labels is not None:
        data.write_idx(tmp / "data" / "train-labels-idx1-ubyte.gz", labels, np.int8)


def partial_mnist(tmp, run):
    (tmp / "data" / "mnist").mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (tmp / "data" / "mnist" / name).write_bytes(b"")


def interrupt(call):
    return lambda tmp, monkeypatch: interrupt_at_evaluation(monkeypatch, call)


def disk_full(tmp, monkeypatch):
    def save_file(tensors, tmp_path, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp_path)
    monkeypatch.setattr("safetensors.numpy.save_file", save_file)


# (what, command, setup(folder, finished run), setup(folder, monkeypatch) or "busy": run with busy/ locked)
CASES = [
    ("negative gradient clipping", "train --clip-grad -1", None, None),
    ("negative final learning rate", "train --min-lr -0.01", None, None),
    ("final learning rate above the peak", "train --lr 0.001 --min-lr 0.01", None, None),
    ("warmup longer than the run", "train --epochs 2 --warmup-epochs 3", None, None),
    ("dropout of 1 or more", "train --drop-rate 1.5", None, None),
    ("MLP of width 0", "train --mlp-ratio 0", None, None),
    ("negative seed", "train --seed -1", None, None),
    ("a number that is not one", "train --epochs many", None, None),
    ("no epochs", "train --epochs 0", None, None),
    ("patches that do not tile the image", "train --patch-size 5", None, None),
    ("width not divisible by heads", "train --embed-dim 30 --num-heads 4", None, None),
    ("unknown device", "train --device tpu", None, None),
    ("output folder below a file", "train --out a-file/run", lambda tmp, run: (tmp / "a-file").write_text(""), None),
    ("disk full when saving", "train --out full " + " ".join(SMALL), None, disk_full),
    ("new settings on resume", "train --resume run --lr 0.1", finished, None),
    ("resuming a finished run", "train --resume run", finished, None),
    ("extending to fewer epochs", "train --resume run --epochs 2", finished, None),
    ("a folder that holds a run", "train --epochs 1 --out run", finished, None),
    ("two runs on one folder", "train --out busy", None, "busy"),
    ("Ctrl-C in the first epoch", "train --epochs 3 --out r " + " ".join(SMALL), None, interrupt(1)),
    ("Ctrl-C in epoch 3", "train --epochs 3 --out r " + " ".join(SMALL), None, interrupt(3)),
    ("export over the checkpoint", "export run run/checkpoint.safetensors", finished, None),
    ("export over an existing file", "export run run/old.safetensors",
     lambda tmp, run: finished(tmp, run) or (tmp / "run" / "old.safetensors").write_text(""), None),
    ("export to another format", "export run vit.pt", finished, None),
    ("a damaged checkpoint", "eval run", damaged, None),
    ("a config that does not fit the tensors", "eval run", wrong_config, None),
    ("exported weights resumed", "train --resume w.safetensors --epochs 3",
     lambda tmp, run: cli.main(["export", str(run), str(tmp / "w.safetensors")]), None),
    ("a data folder that does not exist", "train --data-dir typo", None, None),
    ("another data set's files", "train --preset mnist --data-dir data", mnist_names, None),
    ("labels out of range", "train --preset mnist --data-dir data --no-verify",
     lambda tmp, run: mnist_names(tmp, run, [0, 1, -3, 2] * 5), None),
    ("a data set partly present", "train --preset mnist --data-dir data", partial_mnist, None),
]


def run_case(tmp, monkeypatch, capsys, command, setup, patch, run):
    """(exit code, the last line on stderr) of one case, run in the folder ``tmp``."""
    (tmp / "data").mkdir(exist_ok=True)
    if setup:
        setup(tmp, run)
        capsys.readouterr()
    if callable(patch):
        patch(tmp, monkeypatch)
    monkeypatch.chdir(tmp)
    if patch == "busy":
        with RunFolder(tmp / "busy", log=lambda m: None):
            code = cli.main(command.split())
    else:
        code = cli.main(command.split())
    err = capsys.readouterr().err.strip().splitlines()[-1]
    err = re.sub(r"process \d+ on host \S+", "process PID on host HOST", err.replace(str(tmp) + "/", ""))
    return code, re.sub(r"could not be downloaded \(.*?\); ", "could not be downloaded (<why>); ", err)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", "--epochs", "2", "--out", str(run)] + SMALL) == 0
    return run


def test_docs_errors_md_shows_what_each_case_gets(finished_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MINIVIT_DATA", raising=False)
    for name in ("mnist", "fashion-mnist", "cifar10"):  # never the network
        offline = dataclasses.replace(data.DATASETS[name], urls=("http://127.0.0.1:9/",))
        monkeypatch.setitem(data.DATASETS, name, offline)
    rows = []
    for i, (what, command, setup, patch) in enumerate(CASES):
        with monkeypatch.context() as m:
            tmp = tmp_path / f"case{i}"
            tmp.mkdir()
            code, message = run_case(tmp, m, capsys, command, setup, patch, finished_run)
        assert code in (1, 2, 130) and message.startswith("minivit: "), (command, message)
        rows.append(f"| {what} | `minivit {command.replace(' '.join(SMALL), '...')}` | {code} | "
                    f"`{message}` |".replace("\\|", "|"))
    table = HEADER + "\n".join(rows) + "\n"
    if os.environ.get("MINIVIT_WRITE_DOCS") == "1":
        DOC.write_text(table)
    assert DOC.read_text() == table, "docs/errors.md is out of date: rewrite it with MINIVIT_WRITE_DOCS=1"
