"""dataset.label_noise: seeded flips, always to a wrong class, shared by run and ground truth."""

from __future__ import annotations

import torch

from dattri_cli import builders
from dattri_cli.data import digits
from dattri_cli.data.noise import flip_labels
from tests.conftest import compose_run


def test_flips_are_seeded_counted_and_wrong():
    split = digits(n_train=50, n_test=10)
    noisy, mask = flip_labels(split, 0.2, seed=3)
    again, mask2 = flip_labels(split, 0.2, seed=3)
    assert int(mask.sum()) == 10 and torch.equal(mask, mask2) and torch.equal(noisy.y_train, again.y_train)
    changed = noisy.y_train != split.y_train
    assert torch.equal(changed.long(), mask)
    assert torch.equal(noisy.y_test, split.y_test)
    assert not torch.equal(flip_labels(split, 0.2, seed=4)[1], mask)


def test_pipeline_applies_dataset_label_noise():
    cfg = builders.to_dict(
        compose_run(["dataset.n_train=40", "dataset.n_test=5", "dataset.label_noise=0.25"])
    )
    split, mask = builders.build_split_and_flips(cfg)
    clean = builders.build_split(compose_run(["dataset.n_train=40", "dataset.n_test=5"]))
    assert int(mask.sum()) == 10
    assert int((split.y_train != clean.y_train).sum()) == 10
