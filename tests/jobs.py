"""Helpers shared by job-level tests: tiny MLP generators and specs on tmp_path."""
import numpy as np

from geomjobs.generators.mlp import random_mlp, save_mlp


def write_mlp(tmp_path, sizes=(6, 24, 24, 10), seed=1, name="mlp.npz"):
    path = tmp_path / name
    save_mlp(path, random_mlp(list(sizes), seed=seed))
    return str(path)


def mlp_spec(weights, count=40, shard_size=16, batch_size=8, **descriptors):
    return {
        "model": {"kind": "mlp", "weights": weights, "activation": "relu"},
        "latents": {"kind": "gaussian", "count": count, "shape": [6], "seed": 3},
        "descriptors": descriptors or {"local_scaling": {"mode": "projection", "k": 5}, "local_rank": {}},
        "execution": {"shard_size": shard_size, "batch_size": batch_size},
    }


def read_sorted(uri):
    import pandas as pd

    return pd.read_parquet(uri).sort_values("sample_id").reset_index(drop=True)


def assert_each_sample_once(df, count):
    assert len(df) == count
    np.testing.assert_array_equal(np.sort(df.sample_id.to_numpy()), np.arange(count))
