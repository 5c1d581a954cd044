"""Train minivit's ViT VAE and its PyTorch twin side by side and compare test -ELBO and wall time.

Both start from the same weights (copied by name), see the same batches in the same order, the same binarisation
and the same noise eps (drawn once per step by NumPy and fed to both), the same KL warm-up and the same learning
rate at every step (minivit's WarmupCosine, copied into the torch optimizer), AdamW and gradient clipping as in
``minivit vae``. float32, as users train. Needs PyTorch.

    python benchmarks/vae_twin.py --epochs 3 [--limit N] [--out benchmarks/results/vae-twin.md]
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minivit import data, optim  # noqa: E402
from minivit.nn.vae import binarize, kl_weight  # noqa: E402
from minivit.tensor import no_grad  # noqa: E402
from minivit.testing.torch_vae import torch_vae_like  # noqa: E402
from minivit.vae_train import TestSet, build_model, load_data, settings_for  # noqa: E402


def test_nelbo(model, twin, test, batch_size=256):
    ours, theirs = [], []
    with no_grad(), torch.no_grad():
        for start in range(0, len(test.images), batch_size):
            x, eps = test.images[start:start + batch_size], test.eps[start:start + batch_size]
            _, rec, kl = model(x, eps=eps)
            ours.append(kl.data - rec.data)
            _, rec, kl = twin(torch.from_numpy(x), torch.from_numpy(eps))
            theirs.append((kl - rec).numpy())
    return float(np.concatenate(ours).mean()), float(np.concatenate(theirs).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N train and test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()

    s = settings_for("tiny", epochs=args.epochs, limit=args.limit, seed=args.seed)
    ds = load_data(s, progress=False)
    info = ds.info
    loader = data.DataLoader(ds.train_images, ds.train_labels, s.batch_size, (0.0,) * info.shape[0],
                             (1.0,) * info.shape[0], shuffle=True, seed=s.seed)
    model = build_model(s, info)                       # float32
    twin = torch_vae_like(model, dtype=torch.float32)
    opt = optim.AdamW(optim.param_groups_weight_decay(model, s.weight_decay), lr=s.lr)
    t_opt = torch.optim.AdamW(twin.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps = len(loader)
    sched = optim.WarmupCosine(opt, round(s.warmup_epochs * steps), s.epochs * steps, s.min_lr)
    generator = np.random.default_rng([s.seed, 0])
    test = TestSet(ds, s)
    times = {"minivit": 0.0, "torch": 0.0}
    rows = []
    for epoch in range(s.epochs):
        for i, (x, _) in enumerate(loader.epoch(epoch)):
            step = epoch * steps + i
            x = binarize(x, generator)
            eps = generator.standard_normal((len(x), s.latent_dim)).astype(np.float32)
            beta = kl_weight(step, s.beta, round(s.kl_warmup_epochs * steps))
            lr = opt.param_groups[0]["lr"]

            t0 = time.perf_counter()
            loss = model(x, beta=beta, eps=eps)[0]
            opt.zero_grad()
            loss.backward()
            optim.clip_grad_norm_(model.parameters(), s.clip_grad)
            opt.step()
            sched.step()
            t1 = time.perf_counter()
            for group in t_opt.param_groups:
                group["lr"] = lr
            t_loss = twin(torch.from_numpy(x), torch.from_numpy(eps), beta=beta)[0]
            t_opt.zero_grad()
            t_loss.backward()
            torch.nn.utils.clip_grad_norm_(twin.parameters(), s.clip_grad)
            t_opt.step()
            t2 = time.perf_counter()
            times["minivit"] += t1 - t0
            times["torch"] += t2 - t1
        ours, theirs = test_nelbo(model, twin, test)
        rows.append((epoch + 1, ours, theirs, times["minivit"], times["torch"]))
        print(f"epoch {epoch + 1}: test -ELBO minivit {ours:.2f}  torch {theirs:.2f}  (|diff| {abs(ours - theirs):.2f})"
              f"  train time minivit {times['minivit']:.1f}s  torch {times['torch']:.1f}s", flush=True)

    lines = [f"ViT VAE, tiny preset ({len(ds.train_labels)} train / {len(ds.test_labels)} test images of "
             f"{s.dataset}), seed {s.seed}, float32, torch {torch.__version__} with {torch.get_num_threads()} threads",
             "", "| epoch | test -ELBO minivit (nats) | test -ELBO torch (nats) | difference "
             "| train time so far, minivit (s) | train time so far, torch (s) |", "|---|---|---|---|---|---|"]
    lines += [f"| {e} | {a:.2f} | {b:.2f} | {a - b:+.2f} | {ta:.1f} | {tb:.1f} |" for e, a, b, ta, tb in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
