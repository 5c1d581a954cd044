"""The PyTorch twin of the ViT VAE (minivit.testing.torch_vae): with the weights copied by name and the same noise
eps, it gives the same loss, ELBO parts and parameter gradients as minivit's ViTVAE on one batch (float64, 1e-10
relative). Skipped when PyTorch is not installed."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from minivit.nn import ViTVAE  # noqa: E402
from minivit.testing.torch_vae import torch_vae_like  # noqa: E402

pytestmark = pytest.mark.torch
TOL = 1e-10


def _rel(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_twin_gives_the_same_elbo_and_parameter_gradients(likelihood):
    model = ViTVAE(img_size=28, patch_size=7, latent_dim=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                   likelihood=likelihood, seed=3).double()
    twin = torch_vae_like(model)
    r = np.random.default_rng(0)
    x = r.uniform(size=(6, 1, 28, 28))
    if likelihood == "bernoulli":
        x = (r.uniform(size=x.shape) < x).astype(np.float64)
    eps = r.standard_normal((6, 16))

    loss, rec, kl = model(x, beta=0.6, eps=eps)
    loss.backward()
    t_loss, t_rec, t_kl = twin(torch.from_numpy(x), torch.from_numpy(eps), beta=0.6)
    t_loss.backward()

    assert _rel(loss.data, t_loss.detach().numpy()) < TOL
    assert _rel(rec.data - kl.data, (t_rec - t_kl).detach().numpy()) < TOL     # the ELBO of each image
    assert _rel(kl.data, t_kl.detach().numpy()) < TOL
    ours = dict(model.named_parameters())
    theirs = dict(twin.named_parameters())
    assert set(ours) == set(theirs)
    for name, p in ours.items():
        assert _rel(p.grad, theirs[name].grad.numpy()) < TOL, name
