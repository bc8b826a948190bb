"""bench.py: the CPU smoke run (tiny config) and the FLOP count it reports MFU with."""

import json

import torch

import bench
from unet import UNet


def test_bench_runs_on_cpu_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    rows, fid_img_s = bench.main(["--device", "cpu", "--config", "tiny", "--warmup", "1", "--repeats", "1", "--iters", "1",
                                  "--sample-batch", "4", "--fid-images", "2", "--fid-batch", "2",
                                  "--json", str(out)])
    assert [(r["task"], r["smd"]) for r in rows] == [("train step", False), ("train step", True),
                                                     ("sample step", False), ("sample step", True)]
    assert all(r["ms"] > 0 and r["img_s"] > 0 and r["smd_ratio"] > 0 for r in rows)
    assert rows[0]["smd_ratio"] == 1.0 and rows[2]["smd_ratio"] == 1.0
    assert rows[0]["gflops"] < rows[1]["gflops"] < 1.01 * rows[0]["gflops"]   # SMD's MLPs: < 1% more FLOPs
    assert 2.8 < rows[0]["gflops"] / rows[2]["gflops"] < 3.2                    # train = forward + backward
    if fid_img_s is not None:
        assert fid_img_s["fid.py"] > 0 and fid_img_s.get("pytorch-fid", 1) > 0
    saved = json.loads(out.read_text())
    assert saved["device"] == "CPU" and len(saved["rows"]) == 4


def conv_and_linear_flops(config):
    """2 * MACs of every conv and linear layer of one forward, from the layers' shapes."""
    model, total = UNet(config), [0]

    def hook(m, inp, out):
        if isinstance(m, torch.nn.Conv2d):
            total[0] += 2 * out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
        else:
            total[0] += 2 * out.numel() * m.in_features

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(hook)
    model(torch.randn(1, 3, 32, 32), torch.tensor([1]))
    return total[0]


def test_flop_count_matches_layer_shapes():
    config = bench.CONFIGS["cifar10"]
    forward = bench.flops_per_image(config, use_smd=False, train_step=False)
    layers = conv_and_linear_flops(config)
    assert 1.0 < forward / layers < 1.15                     # the rest is attention's two matmuls
    assert 11e9 < forward < 14e9                             # DDPM's CIFAR-10 U-Net: ~6 GMACs
    train = bench.flops_per_image(config, use_smd=False, train_step=True)
    assert 2.8 < train / forward < 3.2                       # backward costs twice the forward
