"""machinery/bench.py: the CPU smoke run (tiny config), the FLOP count it reports MFU with, and its
refusals of bad flags (one line, exit 2, before any model is built)."""

import json
import re

import pytest
import torch

from machinery import bench
from unet import UNet


def test_bench_runs_on_cpu_and_writes_json(tmp_path, fid_weights, one_thread):
    out = tmp_path / "bench.json"
    rows, fid_img_s = bench.main(["--device", "cpu", "--config", "tiny", "--warmup-iters", "1", "--repeats", "1",
                                  "--iters", "1", "--sample-batch-size", "4", "--fid-images", "1",
                                  "--fid-batch-size", "1", "--fid-weights", fid_weights, "--json", str(out)])
    assert [(r["task"], r["smd"]) for r in rows] == [("train step", False), ("train step", True),
                                                     ("sample step", False), ("sample step", True)]
    assert all(r["ms"] > 0 and r["img_s"] > 0 and r["smd_ratio"] > 0 and r["first_s"] > 0 for r in rows)
    assert rows[0]["smd_ratio"] == 1.0 and rows[2]["smd_ratio"] == 1.0
    assert rows[0]["gflops"] < rows[1]["gflops"] < 1.01 * rows[0]["gflops"]   # SMD's MLPs: < 1% more FLOPs
    assert 2.8 < rows[0]["gflops"] / rows[2]["gflops"] < 3.2                    # train = forward + backward
    assert fid_img_s["fid.py"] > 0 and fid_img_s.get("pytorch-fid", 1) > 0
    saved = json.loads(out.read_text())
    assert saved["device"] == "CPU" and len(saved["rows"]) == 4 and saved["args"]["batch_size"] == 8


def test_bench_times_fid_alone_with_random_weights(tmp_path, monkeypatch, one_thread):
    def never(*a, **k):
        raise AssertionError("--tasks fid built a U-Net")
    monkeypatch.setattr(bench, "UNet", never)
    out = tmp_path / "fid.json"
    rows, fid_img_s = bench.main(["--device", "cpu", "--tasks", "fid", "--fid-weights", "random", "--fid-images", "2",
                                  "--fid-batch-size", "2", "--repeats", "1", "--json", str(out)])
    assert rows == [] and fid_img_s["fid.py"] > 0
    assert json.loads(out.read_text())["fid_img_s"] == fid_img_s


def test_bf16_peak_needs_the_exact_device_name(capsys):
    assert bench.bf16_peak("NVIDIA H100 80GB HBM3") == bench.bf16_peak("NVIDIA H200") == 989e12
    assert bench.bf16_peak("NVIDIA H100 PCIe") == 756e12 and bench.bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert capsys.readouterr().out == ""
    for name in ("NVIDIA H100", "NVIDIA H100 PCIe-X", "H200", "NVIDIA A100"):   # no substring matches
        assert bench.bf16_peak(name) is None
        assert capsys.readouterr().out == f"unknown GPU {name}: no MFU (add its exact name and dense bf16 peak " \
                                          f"to bench.BF16_PEAK)\n"


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


BAD_FLAGS = [  # (argv, {t} standing for a temporary folder; what the one line says)
    (["--batch-size", "0"], "--batch-size: 0 is out of range"),
    (["--sample-batch-size", "x"], "--sample-batch-size: 'x' is not an integer"),
    (["--warmup-iters", "0"], "--warmup-iters: 0 is out of range"),
    (["--repeats", "-1"], "--repeats: -1 is out of range"),
    (["--iters", "0"], "--iters: 0 is out of range"),
    (["--fid-images", "0"], "--fid-images: 0 is out of range"),
    (["--fid-batch-size", "0"], "--fid-batch-size: 0 is out of range"),
    (["--threads", "-1"], "--threads: -1 is out of range"),
    (["--device", "gpu"], "--device: 'gpu' is not a device"),
    (["--config", "huge"], "--config: invalid choice: 'huge'"),
    (["--tasks", "train,fast"], "--tasks: 'train,fast': use a comma-separated list of train, sample, fid"),
    (["--fid-weights", "{t}/w.pth"], "w.pth: no such file; download https://"),
    (["--json", "{t}/no/b.json"], "--json .*: the folder .* does not exist"),
    (["--json", "{t}"], "is a folder: give a file name"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(argv) for argv, _ in BAD_FLAGS])
def test_bench_refuses_bad_flags_in_one_line(argv, message, tmp_path, monkeypatch, capsys):
    def never(*a, **k):
        raise AssertionError("a model was built before the flags were checked")
    monkeypatch.setattr(bench, "UNet", never)
    with pytest.raises(SystemExit) as e:
        bench.main([a.format(t=tmp_path) for a in argv])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and err.count("\n") == 1 and err.startswith("python -m machinery.bench: "), err
    assert re.search(message, err), err


def test_bench_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    help = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert "--threads THREADS CPU threads (0: 1 on machines with <= 4 cores, else as many as torch picks) (default: 0)" in help
    assert "--fid-batch-size FID_BATCH_SIZE images per Inception batch (default: 200)" in help
