"""The CUDA fast paths (skipped without a GPU): no host sync inside a training or sampling
step, compiled and CUDA-graph sampling equal to eager, and train.py / sample.py / bench.py
run as a user runs them, with their CUDA defaults (torch.compile, bf16, fused AdamW, data on
the GPU). A script gets SCRIPT_TIMEOUT seconds (env SMD_SCRIPT_TIMEOUT): a cold inductor
compile can take minutes (282 s for a tiny model on a 2-vCPU machine's CPU backend)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from machinery import bench
import smd
from conftest import ENV, ROOT, TINY, tiny_config
from unet import UNet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SCRIPT_TIMEOUT = int(os.environ.get("SMD_SCRIPT_TIMEOUT", 1800))


def tiny_model(use_smd, device="cuda"):
    torch.manual_seed(0)
    model = UNet(tiny_config(smd=use_smd)).to(device, memory_format=torch.channels_last)
    if use_smd:   # f_phi starts at zero; make the latent matter so eta's path is exercised
        torch.nn.init.normal_(model.soft_mixture.f_phi[-1].weight, std=0.02)
    return model


class no_host_sync:
    """Turns any CUDA op that waits for the GPU (.item(), .cpu(), nonzero, ...) into an error."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("use_smd", [False, True])
def test_train_step_never_waits_for_the_gpu(use_smd):
    model = tiny_model(use_smd)
    net, diffusion = torch.compile(model), smd.Diffusion(100).cuda()
    optimizer = smd.make_optimizer(model, 2e-4, "cuda")
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    x0 = torch.randn(8, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    for _ in range(3):   # compiling may sync; the steps after it must not
        smd.train_step(net, diffusion, optimizer, x0, amp=True)
    with no_host_sync():
        for n in range(5):
            loss = smd.train_step(net, diffusion, optimizer, x0, amp=True)
            smd.ema_update(ema, params, smd.ema_decay(n))
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize("use_smd", [False, True])
def test_sampler_never_waits_for_the_gpu(use_smd):
    model, diffusion = tiny_model(use_smd).eval(), smd.Diffusion(100).cuda()
    g = torch.Generator("cuda").manual_seed(0)
    diffusion.sample(model, (4, 3, 32, 32), steps=5, generator=g)
    with no_host_sync():
        x = diffusion.sample(model, (4, 3, 32, 32), steps=5, generator=g)
    assert x.shape == (4, 3, 32, 32) and x.isfinite().all()


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_sampling_matches_eager(mode, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)   # fp32 on both sides
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model, diffusion = tiny_model(True).eval(), smd.Diffusion(100).cuda()
    net = torch.compile(model, mode=mode)

    def draw(m):
        g = torch.Generator("cuda").manual_seed(1)
        return diffusion.sample(m, (6, 3, 32, 32), steps=10, generator=g)

    draw(net)   # compile (and record the graph) first
    eager, compiled = draw(model), draw(net)
    assert (eager - compiled).abs().max().item() < 1e-3


def script(*argv):
    """Run one of the scripts as a user does; its stdout."""
    try:
        p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=ENV, cwd=ROOT,
                           timeout=SCRIPT_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{argv[0]} ran past SMD_SCRIPT_TIMEOUT={SCRIPT_TIMEOUT} s (compiling?); its output:\n"
                    f"{(e.stdout or b'').decode(errors='replace')[-2000:]}", pytrace=False)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_train_and_sample_with_cuda_defaults(tmp_path, cifar_dir):
    out = tmp_path / "out"
    args = ["train.py", "--dataset", "cifar10", "--data-dir", cifar_dir, "--out-dir", str(out), *TINY, "--smd"]
    log = script(*args, "--max-steps", "4")          # compile and bf16 default on with CUDA
    assert "compile=True, bf16=True" in log and "step 4/4" in log
    assert "resumed at step 4" in script(*args, "--max-steps", "6", "--resume")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and not any(k.startswith("_orig_mod.") for k in ckpt["model"])   # uncompiled module
    npz = tmp_path / "s.npz"
    script("sample.py", "--ckpt", str(out), "--steps", "4", "--n", "5", "--batch-size", "4", "--npz", str(npz))
    images = np.load(npz)["images"]
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8


def test_bench_on_cuda(tmp_path):
    """The FID timing with random weights: the real ones need not be on the GPU machine."""
    log = script("-m", "machinery.bench", "--config", "tiny", "--batch-size", "8", "--sample-batch-size", "8", "--warmup-iters",
                 "2", "--repeats", "2", "--iters", "2", "--fid-images", "8", "--fid-batch-size", "8", "--fid-weights",
                 "random", "--json", str(tmp_path / "b.json"))
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["fid_img_s"]["fid.py"] > 0 and result["fid_img_s"]["fid.py --tf32"] > 0
    rows = result["rows"]
    assert {(r["task"], r["compile"]) for r in rows} == {("train step", False), ("train step", True),
                                                         ("sample step", True), ("sample step", "cuda-graph")}
    assert all(r["mem_gib"] > 0 and r["first_s"] > 0 for r in rows)
    if result["device"] in bench.BF16_PEAK:            # a GPU whose bf16 peak bench.py knows
        assert all(0 < r["mfu"] < 1 for r in rows)
    else:
        assert f"unknown GPU {result['device']}: no MFU" in log and all(r["mfu"] is None for r in rows)
