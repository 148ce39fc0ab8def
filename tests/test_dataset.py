"""Text loading errors, the train/val split, and the batch sampler's reproducibility and resume."""

import json

import numpy as np
import pytest

from npformer.data.dataset import (BatchSampler, DataError, DataFileNotFoundError, load_text,
                                   split_train_val)
from tests.helpers import shared_data_path


def test_load_text_reads_utf8(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("héllo 😀\nworld".encode("utf-8"))
    assert load_text(path) == "héllo 😀\nworld"


def test_load_text_errors(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="not found") as err:
        load_text(tmp_path / "nope.txt")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, DataError)
    assert isinstance(err.value, ValueError)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_bytes("abcé".encode("utf-8") + b"\xff tail")
    with pytest.raises(DataError, match=r"byte 0xff at byte offset 5") as err:
        load_text(tmp_path / "bad.txt")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="directory"):
        load_text(tmp_path)


def test_load_shared_shakespeare():
    text = load_text(shared_data_path())
    assert len(text) > 1_000_000 and "ROMEO" in text


def test_split_train_val():
    ids = np.arange(1000)
    train, val = split_train_val(ids)
    np.testing.assert_array_equal(train, np.arange(900))
    np.testing.assert_array_equal(val, np.arange(900, 1000))
    train, val = split_train_val("abcdefghij", val_fraction=0.3)
    assert (train, val) == ("abcdefg", "hij")
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(ids, val_fraction=1.0)
    with pytest.raises(DataError, match="empty"):
        split_train_val(np.arange(1), val_fraction=0.1)


def test_sampler_windows_are_shifted_slices():
    ids = np.arange(100, 200)
    s = BatchSampler(ids, block_size=8, batch_size=16, seed=0)
    x, y = s.sample()
    assert x.shape == y.shape == (16, 8) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(y, x + 1)                     # y is x shifted by one token
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(8))   # contiguous windows
    assert x.min() >= 100 and y.max() <= 199
    # every start offset 0 .. N-T-1 is drawn, and nothing else
    starts = np.concatenate([s.sample()[0][:, 0] - 100 for _ in range(200)])
    assert set(starts.tolist()) == set(range(s.n_windows)) and s.n_windows == 92


def test_sampler_reproducible_by_seed():
    ids = np.random.default_rng(0).integers(0, 50, size=500)
    a, b, c = (BatchSampler(ids, 16, 4, seed=k) for k in (7, 7, 8))
    for _ in range(5):
        xa, ya = a.sample()
        xb, yb = b.sample()
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a.sample()[0], c.sample()[0])


def test_sampler_exact_resume_through_json():
    ids = np.random.default_rng(1).integers(0, 50, size=500)
    run = BatchSampler(ids, 16, 4, seed=3)
    for _ in range(5):
        run.sample()
    state = json.loads(json.dumps(run.state_dict()))            # JSON-safe plain data
    assert state["seed"] == 3 and state["batches_drawn"] == 5
    expected = [run.sample() for _ in range(4)]
    resumed = BatchSampler(ids, 16, 4, seed=999)
    resumed.load_state_dict(state)
    assert resumed.seed == 3
    for x, y in expected:
        rx, ry = resumed.sample()
        np.testing.assert_array_equal(rx, x)
        np.testing.assert_array_equal(ry, y)
    assert resumed.batches_drawn == run.batches_drawn == 9


def test_sampler_bad_inputs():
    with pytest.raises(DataError, match=r"corpus has 10 tokens, but block_size 10 needs at least 11"):
        BatchSampler(np.arange(10), block_size=10, batch_size=2)
    BatchSampler(np.arange(11), block_size=10, batch_size=2).sample()      # the shortest valid
    with pytest.raises(DataError, match="1-D integer"):
        BatchSampler(np.zeros((4, 30), dtype=np.int64), 8, 2)
    with pytest.raises(DataError, match="1-D integer"):
        BatchSampler(np.linspace(0, 1, 50), 8, 2)
    with pytest.raises(ValueError, match="block_size"):
        BatchSampler(np.arange(50), 0, 2)
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(np.arange(50), 8, -1)
    s = BatchSampler(np.arange(50), 8, 2)
    with pytest.raises(ValueError, match="not a BatchSampler state"):
        s.load_state_dict({"seed": 0})
    with pytest.raises(ValueError, match="'MT19937'"):
        s.load_state_dict({"seed": 0, "batches_drawn": 0,
                           "bit_generator": np.random.MT19937(0).state})
