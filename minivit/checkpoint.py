"""Checkpoints in safetensors: no pickle, written atomically, with everything needed to resume exactly.

One ``.safetensors`` file holds
    tensors   ``model.<timm key>`` for the weights, ``optimizer.<i>.<name>`` for the optimizer's moment arrays
    metadata  JSON strings: the model config, the training settings, the optimizer's hyper-parameters and step
              counts, the schedule, the random generators' states, the epoch and the metrics so far.

Every file written here carries ``minivit.sha256`` in its metadata: a SHA-256 of its tensors (name, dtype, shape and
bytes, in name order) and of the rest of its metadata. Reading checks it, so a damaged file is an error, never
silently wrong weights. (Files from elsewhere, timm's for instance, have no checksum and are read unchecked.)

A file is written to a temporary name in the same folder (``.<name>.<pid>.<random>.tmp``), flushed to disk, then
renamed over the target, so a crash never leaves a half-written checkpoint under the real name.
``remove_stale_temporaries`` deletes the temporary files of processes that were killed while writing.

The model's tensors use timm's names, so ``export_state_dict`` / ``import_state_dict`` move weights to and from
timm (safetensors or ``.npz``, read with ``allow_pickle=False``).
"""

import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "minivit.checkpoint.v1"
CHECKPOINT_NAME = "checkpoint.safetensors"  # the checkpoint inside a run folder
_TEMPORARY = re.compile(r"\..+\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")  # the names atomic_write gives
CHECKSUM_KEY = "minivit.sha256"  # the metadata entry with the checksum (a name no other tool writes)


class CheckpointError(Exception):
    """A checkpoint or state-dict file is missing, corrupt or of another kind."""


def _safetensors():
    try:
        from safetensors import numpy as st_numpy
        from safetensors import safe_open
    except ImportError as e:  # a required dependency; say so plainly if an environment lacks it
        raise CheckpointError("checkpoints need the safetensors package: pip install safetensors") from e
    return st_numpy, safe_open


def atomic_write(path, write):
    """Call ``write(tmp_path)`` to create a temporary file beside ``path``, then rename it to ``path``.

    The temporary name is unique to this process and call; the file gets the permissions of any new file
    (0666 less the umask), whatever ``write`` created it with.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename == str(tmp):  # a full disk, say: name the file the user knows
            e.filename = str(path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def remove_stale_temporaries(folder):
    """Delete the temporary files that writers in ``folder`` left when they were killed; return their paths.

    A temporary file whose writer (the pid in its name) still runs is kept: it may be finishing its write.
    """
    removed = []
    for path in sorted(Path(folder).glob(".*.tmp")):
        match = _TEMPORARY.fullmatch(path.name)
        if match and not _process_exists(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_exists(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def checksum(tensors, metadata):
    """SHA-256 (hex) of the tensors (name, dtype, shape and bytes, in name order) and of the other metadata."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name} {array.dtype.str} {array.shape}\n".encode())
        digest.update(array.tobytes())
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != CHECKSUM_KEY}, sort_keys=True).encode())
    return digest.hexdigest()


def save_tensors(path, tensors, metadata=None):
    """Write a dict of NumPy arrays (and string metadata, plus its checksum) as safetensors, atomically."""
    st_numpy, _ = _safetensors()
    arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}  # 0-d stays 0-d
    metadata = dict(metadata or {})
    metadata[CHECKSUM_KEY] = checksum(arrays, metadata)
    atomic_write(path, lambda tmp: st_numpy.save_file(arrays, tmp, metadata=metadata))
    return Path(path)


def load_tensors(path):
    """Read a safetensors file: (dict of NumPy arrays, metadata dict)."""
    _, safe_open = _safetensors()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if CHECKSUM_KEY in metadata and checksum(tensors, metadata) != metadata[CHECKSUM_KEY]:
        raise CheckpointError(f"{path}: damaged: its contents no longer match the SHA-256 recorded when it was "
                              "written; use another copy (or the run's earlier checkpoint)")
    return tensors, metadata


@dataclass
class Checkpoint:
    """The contents of a training checkpoint."""
    model_state: dict
    config: dict
    optimizer_state: dict = None
    schedule_state: dict = None
    scaler_state: dict = None   # the loss scaler of a mixed-precision run (minivit.amp.GradScaler)
    rng_state: dict = None
    ema_state: dict = None      # the moving average of the weights, when the run kept one (what it evaluated)
    train_settings: dict = field(default_factory=dict)
    epoch: int = 0
    history: list = field(default_factory=list)


def save_checkpoint(path, model, optimizer=None, schedule=None, rng_state=None, train_settings=None, epoch=0,
                    history=(), scaler=None, ema=None):
    """Write model, optimizer, schedule, random states and progress (and the moving average of the weights,
    ``ema``, a model of the same architecture) to one safetensors file, atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    meta = {"format": FORMAT, "config": json.dumps(model.config), "epoch": str(int(epoch)),
            "train_settings": json.dumps(train_settings or {}), "history": json.dumps(list(history)),
            "rng": json.dumps(rng_state or {})}
    if optimizer is not None:
        meta["optimizer"] = _pack_optimizer(optimizer, "optimizer", tensors)
    if schedule is not None:
        meta["schedule"] = json.dumps(schedule.state_dict())
    if scaler is not None:
        meta["scaler"] = json.dumps(scaler.state_dict())
    return save_tensors(path, tensors, meta)


def _pack_optimizer(optimizer, prefix, tensors):
    """Put an optimizer's arrays into ``tensors`` as ``<prefix>.<i>.<name>``; return the rest as a JSON string."""
    state = optimizer.state_dict()
    scalars = {}
    for i, entries in state["state"].items():
        for name, value in entries.items():
            if hasattr(value, "shape"):
                tensors[f"{prefix}.{i}.{name}"] = value
            else:
                scalars.setdefault(str(i), {})[name] = value
    return json.dumps({"type": type(optimizer).__name__, "param_groups": state["param_groups"], "scalars": scalars})


def _unpack_optimizer(text, prefix, tensors):
    """The optimizer state dict that ``_pack_optimizer`` split into ``text`` and ``tensors``."""
    opt = json.loads(text)
    state = {int(i): dict(v) for i, v in opt["scalars"].items()}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            i, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(i), {})[name] = value
    for group in opt["param_groups"]:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"type": opt["type"], "param_groups": opt["param_groups"], "state": state}


def save_training_state(path, models, optimizers, metadata, kind):
    """Write several models and optimizers (a GAN's two networks, say) to one checksummed safetensors file.

    Args:
        models: name -> Module; tensors ``<name>.<key>``, configs in the metadata.
        optimizers: name -> Optimizer; arrays ``<name>.<i>.<state>``.
        metadata: name -> anything JSON can hold (settings, epoch, history, random states).
        kind: the format name recorded in the file and checked on reading (``minivit.gan.v1``, say).
    """
    tensors, meta = {}, {"format": kind, "metadata": json.dumps(metadata)}
    for name, model in models.items():
        tensors.update({f"{name}.{k}": v for k, v in model.state_dict().items()})
    meta["configs"] = json.dumps({name: model.config for name, model in models.items()})
    meta["optimizers"] = json.dumps({name: _pack_optimizer(opt, name, tensors) for name, opt in optimizers.items()})
    return save_tensors(path, tensors, meta)


@dataclass
class TrainingState:
    """What ``save_training_state`` wrote: per name, model states, configs and optimizer states; metadata."""
    models: dict
    configs: dict
    optimizers: dict
    metadata: dict


def load_training_state(path, kind):
    """Read a file written by ``save_training_state`` with format ``kind`` (checksum checked)."""
    tensors, meta = load_tensors(path)
    if meta.get("format") != kind:
        raise CheckpointError(f"{path}: not a {kind} checkpoint (format {meta.get('format')!r})")
    try:
        configs = json.loads(meta["configs"])
        models = {name: {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
                  for name in configs}
        optimizers = {name: _unpack_optimizer(text, name, tensors)
                      for name, text in json.loads(meta["optimizers"]).items()}
        return TrainingState(models, configs, optimizers, json.loads(meta["metadata"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({type(e).__name__}: {e})") from e


def load_checkpoint(path):
    """Read a file written by ``save_checkpoint`` (checksum checked)."""
    tensors, meta = load_tensors(path)
    if meta.get("format") != FORMAT:
        if "config" in meta:
            raise CheckpointError(f"{path}: exported weights, not a training checkpoint: it can be evaluated but "
                                  "not resumed (it holds no optimizer state)")
        raise CheckpointError(f"{path}: not a minivit checkpoint (format {meta.get('format')!r}, "
                              f"expected {FORMAT!r}); for a bare state dict use import_state_dict")
    return _parse_checkpoint(path, tensors, meta)


def _parse_checkpoint(path, tensors, meta):
    try:
        ckpt = Checkpoint(
            model_state={k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
            config=json.loads(meta["config"]), train_settings=json.loads(meta.get("train_settings", "{}")),
            epoch=int(meta.get("epoch", 0)), history=json.loads(meta.get("history", "[]")),
            rng_state=json.loads(meta.get("rng", "{}")))
        ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
        ckpt.ema_state = ema or None
        if "optimizer" in meta:
            ckpt.optimizer_state = _unpack_optimizer(meta["optimizer"], "optimizer", tensors)
        if "schedule" in meta:
            ckpt.schedule_state = json.loads(meta["schedule"])
        if "scaler" in meta:
            ckpt.scaler_state = json.loads(meta["scaler"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({type(e).__name__}: {e})") from e
    return ckpt


def model_from_checkpoint(path):
    """Build the VisionTransformer described by a checkpoint, or by an export that recorded its config, and load
    its weights: those the run evaluated, the moving average when it kept one. Returns (model, Checkpoint); an
    export's Checkpoint has no optimizer or schedule."""
    from minivit.nn import VisionTransformer
    tensors, meta = load_tensors(path)
    if meta.get("format") == FORMAT:
        ckpt = _parse_checkpoint(path, tensors, meta)
    elif "config" in meta:  # written by export_state_dict
        try:
            ckpt = Checkpoint(model_state=tensors, config=json.loads(meta["config"]),
                              train_settings=json.loads(meta.get("train_settings", "{}")))
        except ValueError as e:
            raise CheckpointError(f"{path}: damaged metadata ({e})") from e
    else:
        raise CheckpointError(f"{path}: holds weights but not the model's config (format {meta.get('format')!r}); "
                              "load it into a model you build with import_state_dict")
    try:
        model = VisionTransformer(**ckpt.config)
        model.load_state_dict(ckpt.ema_state or ckpt.model_state)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its config does not fit its tensors ({type(e).__name__}: {e})") from e
    return model, ckpt


# ------------------------------------------------------------------------------------------------ timm interop
def read_state_dict(path):
    """A flat name -> NumPy array dict from ``.safetensors`` or ``.npz`` (never pickle)."""
    path = Path(path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable .npz state dict ({e})") from e
    if path.suffix == ".safetensors":
        tensors, meta = load_tensors(path)
        if meta.get("format") == FORMAT:  # a training checkpoint: take its model
            return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        return tensors
    raise CheckpointError(f"{path}: expected a .safetensors or .npz file")


def import_state_dict(model, path, strict=True):
    """Load a timm-named state dict (safetensors or npz) into ``model`` by name.

    A ``module.`` prefix (from DataParallel) or a ``state_dict``/``model`` wrapper key is removed first. With
    ``strict``, every missing, unexpected and mis-shaped key is reported in one error.
    """
    state = read_state_dict(path)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return model.load_state_dict(state, strict=strict)


def export_state_dict(model, path, train_settings=None):
    """Write ``model``'s weights under timm's names to ``.safetensors`` or ``.npz`` (atomically).

    A ``.safetensors`` export also records the model's config and ``train_settings`` (the data set) in its
    metadata, so that ``model_from_checkpoint`` and ``minivit eval`` can rebuild and evaluate it.
    """
    path = Path(path)
    state = model.state_dict()
    if path.suffix == ".npz":
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **state)
        return atomic_write(path, write)
    if path.suffix == ".safetensors":
        return save_tensors(path, state, {"format": "pt", "config": json.dumps(model.config),
                                          "train_settings": json.dumps(train_settings or {})})
    raise CheckpointError(f"{path}: expected a .safetensors or .npz file name")
