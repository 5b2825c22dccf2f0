import pytest
from torch.utils.data import Dataset

from tpo.data.mixed import MixedDataset


class Numbers(Dataset):
    def __init__(self, tag, n):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return (self.tag, i)


def test_ratios_hold_on_every_prefix_and_items_cycle():
    mix = MixedDataset([Numbers("a", 3), Numbers("b", 50)], ratios=[1, 3], num_samples=40, seed=1)
    items = [mix[i] for i in range(len(mix))]
    assert len(items) == 40
    for n in range(1, 41):
        share = sum(tag == "a" for tag, _ in items[:n]) / n
        assert abs(share - 0.25) <= 1 / n + 1e-9
    a = [i for tag, i in items if tag == "a"]
    assert sorted(a[:3]) == [0, 1, 2] and sorted(a[3:6]) == [0, 1, 2]  # every item once per pass
    again = MixedDataset([Numbers("a", 3), Numbers("b", 50)], ratios=[1, 3], num_samples=40, seed=1)
    assert [again[i] for i in range(40)] == items


def test_default_ratios_follow_sizes():
    mix = MixedDataset([Numbers("a", 2), Numbers("b", 6)])
    assert len(mix) == 8 and sorted(mix[i] for i in range(8)) == sorted([("a", 0), ("a", 1)] + [("b", i) for i in range(6)])


def test_errors():
    with pytest.raises(ValueError, match="one non-negative share"):
        MixedDataset([Numbers("a", 2)], ratios=[1, 1])
    with pytest.raises(ValueError, match="empty"):
        MixedDataset([Numbers("a", 0)])
