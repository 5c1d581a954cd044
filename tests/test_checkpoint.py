"""Checkpoints and state dicts: round trips, atomic writes, clear errors, and timm's layout in and out."""

import json
import os

import numpy as np
import pytest

from minivit import checkpoint, nn, optim
from minivit.checkpoint import CheckpointError

CONFIG = dict(img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=12, depth=2, num_heads=3, mlp_ratio=2.0)


def timm_layout(depth=2, D=12, C=3, P=4, N=5, K=5, F=24, seed=0):
    """A state dict with the keys and shapes that timm's VisionTransformer uses, filled with random numbers."""
    rng = np.random.default_rng(seed)
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, N, D), "patch_embed.proj.weight": (D, C, P, P),
              "patch_embed.proj.bias": (D,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D),
                       b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                       b + "norm2.weight": (D,), b + "norm2.bias": (D,), b + "mlp.fc1.weight": (F, D),
                       b + "mlp.fc1.bias": (F,), b + "mlp.fc2.weight": (D, F), b + "mlp.fc2.bias": (D,)})
    shapes.update({"norm.weight": (D,), "norm.bias": (D,), "head.weight": (K, D), "head.bias": (K,)})
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_timm_state_dict_round_trip(tmp_path, suffix):
    state = timm_layout()
    from safetensors.numpy import save_file
    source = tmp_path / f"timm{suffix}"
    if suffix == ".npz":
        np.savez(source, **{"module." + k: v for k, v in state.items()})  # a DataParallel prefix is accepted
    else:
        save_file(state, str(source))
    model = nn.VisionTransformer(**CONFIG)
    checkpoint.import_state_dict(model, source)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    out = checkpoint.export_state_dict(model, tmp_path / f"out{suffix}")
    back = checkpoint.read_state_dict(out)
    assert set(back) == set(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])


def test_import_reports_every_mismatch(tmp_path):
    state = timm_layout(depth=3)
    state.pop("head.bias")
    np.savez(tmp_path / "bad.npz", **state)
    with pytest.raises(ValueError, match=r"missing keys \(1\): head.bias[\s\S]*unexpected keys \(12\): blocks.2"):
        checkpoint.import_state_dict(nn.VisionTransformer(**CONFIG), tmp_path / "bad.npz")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with open(tmp_path / "obj.npz", "wb") as f:
        np.savez(f, weight=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="obj.npz: not a readable .npz"):
        checkpoint.read_state_dict(tmp_path / "obj.npz")
    with pytest.raises(CheckpointError, match="expected a .safetensors or .npz"):
        checkpoint.read_state_dict(tmp_path / "obj.npy")


def test_checkpoint_round_trip_with_optimizer_and_schedule(tmp_path):
    model = nn.VisionTransformer(**CONFIG)
    opt = optim.AdamW(optim.param_groups_weight_decay(model, 0.05), lr=1e-3)
    sched = optim.WarmupCosine(opt, 2, 10)
    for p in model.parameters():
        p.grad = np.ones_like(p.data)
    opt.step()
    sched.step()
    path = checkpoint.save_checkpoint(tmp_path / "c.safetensors", model, opt, sched, {"x": {"state": 1}},
                                      {"lr": 1e-3}, epoch=3, history=[{"epoch": 1}])
    ckpt = checkpoint.load_checkpoint(path)
    assert ckpt.config == model.config and ckpt.epoch == 3 and ckpt.history == [{"epoch": 1}]
    assert ckpt.train_settings == {"lr": 1e-3} and ckpt.rng_state == {"x": {"state": 1}}
    assert ckpt.schedule_state["last_step"] == 1
    opt2 = optim.AdamW(optim.param_groups_weight_decay(model, 0.05), lr=1e-3)
    opt2.load_state_dict(ckpt.optimizer_state)
    for i, s in opt.state.items():
        assert opt2.state[i]["step"] == s["step"]
        np.testing.assert_array_equal(opt2.state[i]["exp_avg_sq"], s["exp_avg_sq"])
    assert opt2.param_groups[0]["betas"] == (0.9, 0.999)
    rebuilt, _ = checkpoint.model_from_checkpoint(path)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(rebuilt.state_dict()[k], v)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "c.safetensors"
    target.write_bytes(b"old")

    def failing(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["c.safetensors"]


def test_corrupt_and_foreign_files_get_clear_errors(tmp_path):
    model = nn.VisionTransformer(**CONFIG)
    path = checkpoint.save_checkpoint(tmp_path / "c.safetensors", model)
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors file"):
        checkpoint.load_checkpoint(tmp_path / "cut.safetensors")
    checkpoint.export_state_dict(model, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="exported weights, not a training checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "plain.safetensors")
    from safetensors.numpy import save_file
    save_file(model.state_dict(), str(tmp_path / "timm.safetensors"))
    with pytest.raises(CheckpointError, match="not a minivit checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "timm.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoint.load_checkpoint(tmp_path / "missing.safetensors")


def test_files_get_the_permissions_of_any_new_file(tmp_path):
    umask = os.umask(0o022)
    try:
        path = checkpoint.save_checkpoint(tmp_path / "c.safetensors", nn.VisionTransformer(**CONFIG))
        assert os.stat(path).st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def flip(path, start, count=1):
    """Invert ``count`` bytes of a file from offset ``start`` (negative: from the end)."""
    raw = bytearray(path.read_bytes())
    start %= len(raw)
    for i in range(start, start + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_checksum_guards_the_tensors_and_the_metadata(tmp_path):
    model = nn.VisionTransformer(**CONFIG)
    path = checkpoint.save_checkpoint(tmp_path / "c.safetensors", model, epoch=2, history=[{"test_acc": 0.75}])
    tensors, meta = checkpoint.load_tensors(path)
    assert meta["minivit.sha256"] == checkpoint.checksum(tensors, meta) and len(meta["minivit.sha256"]) == 64
    good = path.read_bytes()
    flip(path, -5)  # one byte of the last tensor's data
    with pytest.raises(CheckpointError, match="c.safetensors: damaged: its contents no longer match the SHA-256"):
        checkpoint.load_checkpoint(path)
    assert good.count(b"0.75") == 1
    path.write_bytes(good.replace(b"0.75", b"0.95"))  # a changed metadata value: the header still parses
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.load_checkpoint(path)
    path.write_bytes(good)
    assert checkpoint.load_checkpoint(path).history == [{"test_acc": 0.75}]


def test_files_without_a_checksum_are_read_unchecked(tmp_path):
    from safetensors.numpy import save_file
    state = timm_layout()
    save_file(state, str(tmp_path / "timm.safetensors"))
    assert set(checkpoint.read_state_dict(tmp_path / "timm.safetensors")) == set(state)


def test_an_export_records_the_config_and_is_checked(tmp_path):
    model = nn.VisionTransformer(**CONFIG)
    path = checkpoint.export_state_dict(model, tmp_path / "vit.safetensors", train_settings={"dataset": "x"})
    rebuilt, ckpt = checkpoint.model_from_checkpoint(path)
    assert ckpt.config == model.config and ckpt.train_settings == {"dataset": "x"} and ckpt.optimizer_state is None
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(rebuilt.state_dict()[k], v)
    flip(path, -3)
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.read_state_dict(path)


def test_a_config_that_does_not_fit_the_tensors_is_a_checkpoint_error(tmp_path):
    model = nn.VisionTransformer(**CONFIG)
    path = checkpoint.save_checkpoint(tmp_path / "c.safetensors", model)
    tensors, meta = checkpoint.load_tensors(path)
    for config in ({**CONFIG, "depth": 3}, {**CONFIG, "colour": True}):
        checkpoint.save_tensors(path, tensors, {**meta, "config": json.dumps(config)})
        with pytest.raises(CheckpointError, match="c.safetensors: its config does not fit its tensors"):
            checkpoint.model_from_checkpoint(path)


def test_a_scalar_tensor_keeps_its_shape(tmp_path):
    """np.ascontiguousarray turns a 0-d array into (1,); the improved spectral norm's sigma_init is 0-d."""
    path = checkpoint.save_tensors(tmp_path / "s.safetensors", {"scalar": np.array(2.5, np.float32)})
    tensors, _ = checkpoint.load_tensors(path)
    assert tensors["scalar"].shape == () and tensors["scalar"] == 2.5
