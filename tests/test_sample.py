"""sample.py on CPU: same seed same images, the outputs fid.py reads, eta-sensitivity for SMD
checkpoints, and clear errors for bad checkpoints and bad --steps."""

import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_same_seed_same_images(tiny_ckpts, sampler):
    model, diffusion, config = sample.load_checkpoint(tiny_ckpts["smd"])
    assert config["smd"] and config["step"] == 3 and not model.training
    gen = lambda seed: sample.generate(model, diffusion, 5, batch_size=4, steps=4, sampler=sampler, seed=seed,
                                       progress=False)
    a, b, c = gen(0), gen(0), gen(1)
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_cli_writes_grid_and_npz(tiny_ckpts, tmp_path, capsys):
    grid, npz = str(tmp_path / "g.png"), str(tmp_path / "s.npz")
    images = sample.main(["--ckpt", tiny_ckpts["smd"], "--steps", "3", "--n", "5", "--batch-size", "4",
                          "--grid", grid, "--npz", npz])
    out = capsys.readouterr().out
    assert "img/s" in out and "ETA" in out and "eta-sensitivity" in out
    assert np.array_equal(np.load(npz)["images"], images) and images.shape == (5, 32, 32, 3)
    assert Image.open(grid).size == (3 * 32, 2 * 32)   # 5 images in a 3-column grid
    again = sample.main(["--ckpt", tiny_ckpts["ddpm"], "--steps", "3", "--n", "2", "--grid", grid, "--no-ema"])
    assert again.shape == (2, 32, 32, 3) and "eta-sensitivity" not in capsys.readouterr().out


def test_clear_errors(tiny_ckpts, tmp_path):
    def fails(path, match, *extra):
        with pytest.raises(SystemExit, match=match):
            sample.main(["--ckpt", str(path), "--steps", "3", "--n", "1", *extra])
    fails(tmp_path / "missing.pt", "no checkpoint at")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(tiny_ckpts["ddpm"], "rb").read()[:5000])
    fails(truncated, "not a readable checkpoint")
    (tmp_path / "text.pt").write_text("hello")
    fails(tmp_path / "text.pt", "not a readable checkpoint")
    torch.save({"model": {}, "model_args": {"n_layer": 12}}, tmp_path / "gpt.pt")   # another project's ckpt
    fails(tmp_path / "gpt.pt", "not a train.py checkpoint")
    ckpt = torch.load(tiny_ckpts["ddpm"], weights_only=True)
    ckpt["config"]["ch"] = 64
    torch.save(ckpt, tmp_path / "other.pt")
    fails(tmp_path / "other.pt", "do not fit the U-Net")
    fails(tiny_ckpts["ddpm"], r"--steps 200 > T=100", "--steps", "200")
    fails(tiny_ckpts["ddpm"], "--cuda-graph needs a CUDA device", "--device", "cpu", "--cuda-graph")
    shutil.copy(tiny_ckpts["ddpm"], tmp_path / "ok.pt")   # and a good one still loads
    assert sample.load_checkpoint(str(tmp_path / "ok.pt"))[2]["T"] == 100
