"""Evaluate one model on a labelled set in shards over the ranks and whole on each: the script behind
tests/test_distributed.py's check of ``minivit.train.evaluate_shared``.

    python -m minivit.launch -n 2 tests/mpi/evaluate_shards.py OUT.json

Rank 0 writes both results (loss, accuracy) to OUT.json: on 101 images, so the shards differ in size, and on one
image, which leaves the other rank nothing to evaluate.
"""

import json
import sys
from types import SimpleNamespace

import numpy as np

from minivit import distributed, nn, train


def main():
    world = distributed.world()
    model = nn.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1,
                                 num_heads=2, seed=0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (101, 1, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 3, 101)
    info = SimpleNamespace(mean=(0.5,), std=(0.25,))
    settings = train.TrainSettings(flip_tta=True, tta_shift=1)      # a run's final evaluation: ten views
    shared = train.evaluate_shared(model, images, labels, info, settings, final=True)
    whole = train.evaluate(model, images, labels, info.mean, info.std, flip=True, shift=1)
    one = train.evaluate_shared(model, images[:1], labels[:1], info, settings, final=True)  # rank 1 gets none
    alone = train.evaluate(model, images[:1], labels[:1], info.mean, info.std, flip=True, shift=1)
    if world.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump({"ranks": world.size, "shared": list(shared), "whole": [whole["loss"], whole["acc"]],
                       "one_shared": list(one), "one_whole": [alone["loss"], alone["acc"]]}, f)


if __name__ == "__main__":
    main()
