"""The order of the training data: one global batch per optimiser step, its
samples drawn from a permutation that depends only on ``(seed, epoch)``, split
into the micro-batches of each process and accumulation round.

A run resumed at step ``s`` of epoch ``e`` skips to the same place without
loading the skipped samples, and a run on W processes sees the same global
batches as a run on one process (only who computes which micro-batch differs).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of ``epoch``: a function of ``seed`` and ``epoch`` only."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples)


class StepBatchSampler(Sampler[list[int]]):
    """Yields this process's micro-batches (lists of dataset indices), step by
    step: ``grad_accum`` micro-batches of ``micro_batch_size`` per step.

    The global batch of step ``k`` of an epoch is ``perm[k*B:(k+1)*B]`` with
    ``B = micro_batch_size * grad_accum * num_processes``; it is cut into
    ``grad_accum * num_processes`` consecutive chunks, chunk ``a * W + r``
    going to process ``r`` in accumulation round ``a``. The last incomplete
    global batch of an epoch is dropped, so every step sees ``B`` samples.

    ``set_epoch(epoch, start_step)`` selects the epoch and the step to start
    from (a resumed run skips the steps already taken).
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        grad_accum: int = 1,
        num_processes: int = 1,
        process_index: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if micro_batch_size < 1 or grad_accum < 1 or num_processes < 1:
            raise ValueError("micro_batch_size, grad_accum and num_processes must be >= 1")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is not in [0, {num_processes})")
        self.num_samples = int(num_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.grad_accum = int(grad_accum)
        self.num_processes = int(num_processes)
        self.process_index = int(process_index)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.start_step = 0

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.num_processes

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is not in [0, {self.steps_per_epoch}] (steps per epoch)")
        self.epoch, self.start_step = int(epoch), int(start_step)

    def global_batch(self, step: int) -> np.ndarray:
        """Dataset indices of the whole global batch of ``step`` in the current epoch."""
        order = (
            epoch_permutation(self.num_samples, self.seed, self.epoch) if self.shuffle else np.arange(self.num_samples)
        )
        size = self.global_batch_size
        return order[step * size : (step + 1) * size]

    def __iter__(self) -> Iterator[list[int]]:
        order = (
            epoch_permutation(self.num_samples, self.seed, self.epoch) if self.shuffle else np.arange(self.num_samples)
        )
        size, micro, world = self.global_batch_size, self.micro_batch_size, self.num_processes
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * size : (step + 1) * size]
            for a in range(self.grad_accum):
                chunk = a * world + self.process_index
                yield batch[chunk * micro : (chunk + 1) * micro].tolist()

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum


class EvalSampler(Sampler[list[int]]):
    """Evaluation batches: the dataset in order, ``batch_size`` per batch, the
    batches dealt round-robin to the processes (the last may be short); at most
    ``max_batches`` batches in all when given.

    ``even=True`` (sharded parameters: FSDP, where every forward pass
    is a collective) gives every process the same number of batches: a
    process with fewer batches of its own repeats its last one (or the first
    batch of the set when it has none); the batches from ``num_own_batches``
    on are such padding, for the caller to leave out of the results.
    """

    def __init__(self, num_samples: int, batch_size: int, num_processes: int = 1, process_index: int = 0,
                 max_batches: int | None = None, even: bool = False):
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.num_processes, self.process_index = int(num_processes), int(process_index)
        total = -(-self.num_samples // self.batch_size)
        self.num_batches = total if max_batches is None else min(total, int(max_batches))
        self.own = list(range(self.process_index, self.num_batches, self.num_processes))
        self.num_own_batches = len(self.own)
        per_process = -(-self.num_batches // self.num_processes) if even else self.num_own_batches
        self.order = self.own + [self.own[-1] if self.own else 0] * (per_process - self.num_own_batches)
        if self.num_batches == 0:
            self.order = []

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.order:
            yield list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.num_samples)))

    def __len__(self) -> int:
        return len(self.order)
