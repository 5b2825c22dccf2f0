"""Mixing datasets at set ratios (TPO's co-training: task data mixed with
conversation data)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from tpo.registry import DATASETS, build_child, current_config_key


@DATASETS.register_module()
class MixedDataset(Dataset):
    """Items drawn from several datasets at ``ratios``, deterministically.

    Position ``i`` of the mix takes the next item of the dataset that is most
    behind its share after ``i`` items (so any prefix of the mix keeps the
    ratios as closely as whole items allow); each dataset is walked in a
    seeded permutation, and starts a new one when exhausted.

    Args:
        datasets: dataset configs (or datasets).
        ratios: their shares (normalised); default: by their sizes.
        num_samples: the length of the mix; default: the sum of the sizes.
        seed: the permutation seed.
    """

    def __init__(
        self,
        datasets: Sequence[Mapping[str, Any] | Dataset],
        ratios: Sequence[float] | None = None,
        num_samples: int | None = None,
        seed: int = 0,
    ):
        if not datasets:
            raise ValueError(f"{current_config_key('datasets')}: give at least one dataset")
        self.datasets = [
            build_child(d, DATASETS, f"datasets.{i}") if isinstance(d, Mapping) else d for i, d in enumerate(datasets)
        ]
        sizes = [len(d) for d in self.datasets]
        for i, size in enumerate(sizes):
            if size == 0:
                raise ValueError(f"{current_config_key(f'datasets.{i}')}: the dataset is empty; check its file and filters")
        if ratios is None:
            ratios = sizes
        if len(ratios) != len(sizes) or any(r < 0 for r in ratios) or sum(ratios) <= 0:
            raise ValueError(
                f"{current_config_key('ratios')}: give one non-negative share per dataset ({len(sizes)}), "
                f"not all zero; got {list(ratios)}"
            )
        shares = np.asarray(ratios, dtype=np.float64) / float(sum(ratios))
        total = int(num_samples) if num_samples is not None else sum(sizes)
        if total <= 0:
            raise ValueError(f"{current_config_key('num_samples')}: must be positive, got {num_samples}")
        rng = np.random.default_rng(seed)
        orders = [rng.permutation(size) for size in sizes]
        taken = np.zeros(len(sizes), dtype=np.int64)
        self.index: list[tuple[int, int]] = []
        for i in range(total):
            which = int(np.argmax(shares * (i + 1) - taken))
            k = int(taken[which])
            size = sizes[which]
            if k and k % size == 0:  # a new pass over that dataset
                orders[which] = np.concatenate([orders[which], rng.permutation(size)])
            self.index.append((which, int(orders[which][k])))
            taken[which] += 1

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        which, k = self.index[i]
        return self.datasets[which][k]
