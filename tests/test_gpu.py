"""CuPy: the same model on the GPU agrees with NumPy, and a training step makes no host-device transfer.

Skipped where CuPy or a CUDA device is missing (the op-level tests also run on CuPy through the `xp` fixture).
"""

import numpy as np
import pytest

from minivit import devices, functional as F, nn, optim

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not devices.cuda_available(),
                                                  reason="CuPy with a CUDA device is not available")]

CONFIG = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)


def test_vit_forward_and_backward_agree_between_numpy_and_cupy():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3, 16, 16)).astype(np.float32), rng.integers(0, 5, 4)
    cpu = nn.VisionTransformer(**CONFIG, seed=1)
    gpu = nn.VisionTransformer(**CONFIG, seed=1).to("cuda")
    assert gpu.device == "cuda"
    loss_cpu = F.cross_entropy(cpu(x), y)
    loss_cpu.backward()
    loss_gpu = F.cross_entropy(gpu(devices.to_device(x, "cuda")), devices.to_device(y, "cuda"))
    loss_gpu.backward()
    np.testing.assert_allclose(float(loss_gpu.item()), loss_cpu.item(), rtol=1e-5)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        np.testing.assert_allclose(devices.asnumpy(q.grad), p.grad, rtol=1e-3, atol=1e-5, err_msg=name)


def test_a_training_step_makes_no_host_device_transfer():
    import cupy
    model = nn.VisionTransformer(**CONFIG, seed=1).to("cuda")
    opt = optim.AdamW(optim.param_groups_weight_decay(model, 0.05), lr=1e-3)
    sched = optim.WarmupCosine(opt, 2, 10)
    x = cupy.asarray(np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32))
    y = cupy.asarray(np.random.default_rng(1).integers(0, 5, 8))
    before = dict(devices.transfers)
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        optim.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    assert devices.transfers == before
    assert bool(cupy.isfinite(loss.data))


def test_the_cli_trains_on_the_gpu(tmp_path):
    from minivit import cli
    args = ["train", "--device", "cuda", "--epochs", "1", "--limit", "256", "--embed-dim", "16", "--depth", "1",
            "--num-heads", "2", "--no-progress", "--out", str(tmp_path / "run")]
    assert cli.main(args) == 0
    assert cli.main(["eval", str(tmp_path / "run"), "--device", "cuda"]) == 0


def test_gradient_checks_run_in_float64_on_the_gpu():
    import cupy
    from minivit.gradcheck import gradcheck
    model = nn.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1,
                                 num_heads=2).to("cuda")
    x = cupy.asarray(np.random.default_rng(0).standard_normal((2, 1, 8, 8)))
    report = gradcheck(model, [x], mode="directional")
    assert report.ok and report.max_rel < 1e-6, report
