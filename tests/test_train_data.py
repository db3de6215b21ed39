"""Batches by consumed samples: the same global batches whatever the data-parallel size."""

import numpy as np
import pytest

from pretrain.config import ConfigError, config_from_dict
from pretrain.data import BatchSource, MixData, check_data


class FakeDataset:
    """The interface of data_tools.mix.load_mix's datasets: sample k is k, k+1, ... (seq_length + 1 ids)."""

    seq_length, vocab_size, eod_id = 8, 1000, 2

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> np.ndarray:
        if not 0 <= idx < self.size:
            raise IndexError(idx)
        return np.arange(idx, idx + self.seq_length + 1, dtype=np.int64)


def cfg(**batch):
    return config_from_dict({"data": {"mix_dir": "x"}, "run": {"steps": 10},
                             "batch": {"micro_batch_size": 2, "global_batch_size": 8, "seq_length": 8, **batch}})


def first_tokens(batches) -> list[int]:
    return [int(row[0]) for batch in batches for row in batch.input_ids]


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_global_batches_do_not_depend_on_the_data_parallel_size(dp_size):
    config, data = cfg(), FakeDataset(100)
    for consumed in (0, 8, 40):
        ranks = [BatchSource(config, data, rank, dp_size).global_batch(consumed) for rank in range(dp_size)]
        assert all(len(batches) == 4 // dp_size for batches in ranks)  # micro-batches = accumulation steps
        assert sum((first_tokens(b) for b in ranks), []) == list(range(consumed, consumed + 8))


def test_labels_are_inputs_shifted_by_one():
    batch = BatchSource(cfg(), FakeDataset(100), 0, 1).global_batch(16)[0]
    assert batch.input_ids[0].tolist() == list(range(16, 24)) and batch.labels[0].tolist() == list(range(17, 25))


def test_eval_batches_are_fixed_and_capped_by_the_split():
    source = BatchSource(cfg(), FakeDataset(9), 1, 2)
    assert first_tokens(source.eval_batches(5)) == [2, 3, 6, 7]  # two rounds of 4 fit in 9 samples


def test_check_data_errors():
    data = MixData(FakeDataset(100), FakeDataset(10))
    check_data(cfg(), data, 2)
    with pytest.raises(ConfigError, match=r"multiple of micro_batch_size × data-parallel size \(2 × 3\)"):
        check_data(cfg(), data, 3)
    with pytest.raises(ConfigError, match="80 samples, but the mix's train split has 50"):
        check_data(cfg(), MixData(FakeDataset(50), FakeDataset(10)), 1)
    with pytest.raises(ConfigError, match="valid split, which has 1 samples"):
        check_data(cfg(), MixData(FakeDataset(100), FakeDataset(1)), 1)
