"""The data order: global batches that depend only on (seed, epoch), the same
for any number of processes and accumulation rounds, and a resumed epoch that
skips exactly the steps already taken."""
import numpy as np
import pytest

from tpo.engine.sampler import EvalSampler, StepBatchSampler, epoch_permutation


def _steps(sampler):
    """The micro-batches of each step (grad_accum of them per step)."""
    batches = list(sampler)
    a = sampler.grad_accum
    return [batches[i : i + a] for i in range(0, len(batches), a)]


def test_processes_and_accumulation_share_the_global_batches():
    one = StepBatchSampler(23, micro_batch_size=4, grad_accum=1, seed=3)
    assert one.steps_per_epoch == 5 and len(one) == 5  # 23 // 4, the last 3 samples dropped
    for world, accum, micro in ((2, 1, 2), (2, 2, 1), (1, 4, 1), (4, 1, 1)):
        ranks = [StepBatchSampler(23, micro, accum, world, r, seed=3) for r in range(world)]
        per_rank = [_steps(s) for s in ranks]
        for step, whole in enumerate(_steps(one)):
            pieces = sorted(i for r in range(world) for mb in per_rank[r][step] for i in mb)
            assert pieces == sorted(whole[0]), (world, accum, step)


def test_order_depends_on_seed_and_epoch_only():
    a, b = StepBatchSampler(16, 4, seed=1), StepBatchSampler(16, 4, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    c = StepBatchSampler(16, 4, seed=2)
    assert list(a) != list(c)
    np.testing.assert_array_equal(np.concatenate(list(a)), epoch_permutation(16, 1, 0))


def test_resume_skips_the_steps_taken():
    full = StepBatchSampler(40, 2, grad_accum=2, seed=0)
    full.set_epoch(3)
    everything = list(full)
    for start in (0, 1, 4, full.steps_per_epoch):
        resumed = StepBatchSampler(40, 2, grad_accum=2, seed=0)
        resumed.set_epoch(3, start_step=start)
        assert list(resumed) == everything[start * 2 :] and len(resumed) == len(everything) - start * 2
    with pytest.raises(ValueError, match="start_step"):
        full.set_epoch(0, start_step=full.steps_per_epoch + 1)


def test_eval_batches_cover_the_set_once():
    shards = [list(EvalSampler(11, 3, num_processes=2, process_index=r)) for r in range(2)]
    assert sorted(i for s in shards for b in s for i in b) == list(range(11))
    assert len(list(EvalSampler(11, 3, max_batches=2))) == 2


def test_even_eval_batches_pad_the_short_processes():
    """Sharded parameters: every process runs as many batches; the ones past
    ``num_own_batches`` are padding, and the real ones still cover the set once."""
    for n, world in ((11, 2), (11, 3), (3, 4), (0, 2)):
        shards = [EvalSampler(n, 3, num_processes=world, process_index=r, even=True) for r in range(world)]
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-(-(-n // 3)) // world)
        real = [b for s in shards for b in list(s)[: s.num_own_batches]]
        assert sorted(i for b in real for i in b) == list(range(n))
        for s in shards:
            assert all(len(b) > 0 for b in s)  # padding repeats a real batch
        uneven = [EvalSampler(n, 3, num_processes=world, process_index=r) for r in range(world)]
        assert [list(u) for u in uneven] == [list(s)[: s.num_own_batches] for s in shards]
