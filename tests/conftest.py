"""Fixtures for tests/test_train.py and tests/test_sample.py: tiny configs, data written in
torchvision's on-disk formats, and small checkpoints trained by train.py."""

import os
import pickle
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# a U-Net small enough for a CPU step in well under a second
TINY = ["--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn-res", "", "--latent-dim", "8",
        "--T", "100", "--batch-size", "4", "--warmup", "2", "--workers", "0", "--log-every", "1",
        "--sample-every", "0", "--ckpt-every", "1000"]


def write_cifar10(root, n_per_batch=8, seed=0):
    """CIFAR-10 as torchvision stores it: root/cifar-10-batches-py/data_batch_{1..5} (pickled
    dicts with 'data' (N, 3072) uint8 and 'labels'), test_batch and batches.meta. Returns the
    training images as (N, 3, 32, 32)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    images = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": data, "labels": list(rng.integers(0, 10, n_per_batch))}, f)
        if name != "test_batch":
            images.append(data)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    return np.concatenate(images).reshape(-1, 3, 32, 32)


@pytest.fixture
def cifar_dir(tmp_path):
    write_cifar10(tmp_path / "data")
    return str(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """{'ddpm': path, 'smd': path} to checkpoints of tiny models trained 3 steps on fake CIFAR-10."""
    import torch
    import train
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ckpts")
    write_cifar10(root / "data")
    paths = {}
    for kind in ("ddpm", "smd"):
        out = root / kind
        train.main(["--dataset", "cifar10", "--data-dir", str(root / "data"), "--out-dir", str(out),
                    "--max-steps", "3", *TINY, *(["--smd"] if kind == "smd" else [])])
        paths[kind] = str(out / "ckpt.pt")
    torch.set_num_threads(n)
    return paths


@pytest.fixture
def one_thread():
    """On a small shared CPU one intra-op thread is several times faster than two."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
