"""sample.py on CPU: same seed same images, the outputs fid.py reads, eta-sensitivity for SMD
checkpoints, --fixed-eta and --clip-x0, old checkpoints, and clear errors for bad checkpoints
and bad --steps."""

import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from checkpoint import load_checkpoint
import pretrained
from conftest import OLD_CKPT, SMALL_CONFIG, diffusers_model, save_hub_files

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_same_seed_same_images(tiny_ckpts, sampler):
    model, diffusion, config = load_checkpoint(tiny_ckpts["smd"])
    assert config["smd"] and config["step"] == 3 and not model.training
    gen = lambda seed: sample.generate(model, diffusion, 5, batch_size=4, steps=4, sampler=sampler, seed=seed,
                                       progress=False)
    a, b, c = gen(0), gen(0), gen(1)
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_cli_writes_grid_and_npz(tiny_ckpts, tmp_path, capsys):
    grid, npz = str(tmp_path / "g.png"), str(tmp_path / "s.npz")
    images = sample.main(["--ckpt", tiny_ckpts["smd"], "--steps", "3", "--n", "5", "--batch-size", "4",
                          "--grid", grid, "--npz", npz, "--eta-sensitivity", "8"])
    out = capsys.readouterr().out
    assert "img/s" in out and "ETA" in out
    assert re.search(r"eta-sensitivity \d\.\d{4} .*8 cifar10 images\); per t: 0: \d\.\d{3}, 11: ", out)
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
    torch.save({"config": {"T": 10}, "ema": {}}, tmp_path / "nofields.pt")
    fails(tmp_path / "nofields.pt", r"its config lacks \['image_size'")
    ckpt = torch.load(tiny_ckpts["ddpm"], weights_only=True)
    ckpt["model_config"]["ch"] = 64
    torch.save(ckpt, tmp_path / "other.pt")
    fails(tmp_path / "other.pt", "do not fit the U-Net")
    fails(tiny_ckpts["ddpm"], r"--steps 200 > T=100", "--steps", "200")
    fails(tiny_ckpts["ddpm"], "--cuda-graph needs a CUDA device", "--device", "cpu", "--cuda-graph")
    shutil.copy(tiny_ckpts["ddpm"], tmp_path / "ok.pt")   # and a good one still loads
    assert load_checkpoint(str(tmp_path / "ok.pt"))[2]["T"] == 100


def test_old_checkpoint_computes_what_it_computed():
    """OLD_CKPT (train.py at 64a42b5) loads with its own GroupNorm eps and padding, and its EMA
    model gives the output that code gave (saved beside it); today's defaults would not."""
    model, diffusion, info = load_checkpoint(OLD_CKPT)
    ref = torch.load(OLD_CKPT.replace(".pt", "_output.pt"), weights_only=True)
    assert diffusion.T == 10 and info["step"] == 6 and info["smd"] and info["norm_eps"] == 1e-5
    with torch.no_grad():
        out = model(ref["x"], ref["t"], ref["eta"])
        torch.testing.assert_close(out, ref["eps_hat"], rtol=0, atol=1e-6)
        for m in model.modules():   # the current defaults give another function
            if isinstance(m, torch.nn.GroupNorm):
                m.eps = 1e-6
            if hasattr(m, "tf_pad"):
                m.tf_pad, m.conv.padding = True, (0, 0)
        assert (model(ref["x"], ref["t"], ref["eta"]) - ref["eps_hat"]).abs().max() > 1e-4


def test_fixed_eta_makes_smd_ddim_deterministic(tiny_ckpts, tmp_path):
    """An SMD model whose latent matters: DDIM at --ddim-eta 0 differs between two seeds' etas
    only through eta; with --fixed-eta zero the same x_T gives bit-identical images."""
    ckpt = torch.load(tiny_ckpts["smd"], weights_only=True)
    g = torch.Generator().manual_seed(0)
    for key in ("model", "ema"):   # a latent that changes the output
        for k, v in ckpt[key].items():
            if k.startswith("mixture.f_phi"):
                v.copy_(torch.randn(v.shape, generator=g) * 0.5)
    torch.save(ckpt, tmp_path / "smd.pt")
    model, diffusion, _ = load_checkpoint(str(tmp_path / "smd.pt"))
    draw = lambda mode: sample.generate(model, diffusion, 4, steps=5, sampler="ddim", eta_mode=mode, progress=False)
    assert np.array_equal(draw("zero"), draw("zero")) and np.array_equal(draw("fixed"), draw("fixed"))
    assert not np.array_equal(draw("fresh"), draw("zero"))   # same x_T (seed 0): eta is the difference
    argv = ["--ckpt", str(tmp_path / "smd.pt"), "--sampler", "ddim", "--steps", "5", "--n", "4", "--grid",
            str(tmp_path / "g.png"), "--eta-sensitivity", "0"]
    assert np.array_equal(sample.main([*argv, "--fixed-eta", "zero"]), draw("zero"))
    assert np.array_equal(sample.main([*argv, "--fixed-eta"]), draw("fixed"))
    clipped = sample.main([*argv, "--fixed-eta", "--clip-x0"])
    assert clipped.shape == (4, 32, 32, 3) and not np.array_equal(clipped, draw("fixed"))


def test_sample_from_published_weights(tmp_path, monkeypatch, capsys):
    """--ckpt takes diffusers' DDPM files (here random weights in a small config) and samples
    on DDPM's chain; a hub id that cannot be downloaded says which files to fetch, and where."""
    small = dict(SMALL_CONFIG, in_channels=3, out_channels=3)
    folder = save_hub_files(str(tmp_path / "ddpm"), diffusers_model(small), small, bin=False)
    images = sample.main(["--ckpt", folder, "--steps", "3", "--n", "2", "--grid", str(tmp_path / "g.png")])
    assert images.shape == (2, 32, 32, 3) and "published weights" in capsys.readouterr().out

    def offline(url, dst, *a, **k):
        raise OSError("Name or service not known")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SystemExit, match=r"(?s)could not download google/ddpm-cifar10-32.*"
                                         r"https://huggingface.co/google/ddpm-cifar10-32/resolve/main/config.json"
                                         r".*hub/checkpoints/google--ddpm-cifar10-32/diffusion_pytorch_model.bin"):
        sample.main(["--ckpt", pretrained.DEFAULT_MODEL, "--n", "1"])


def test_mixture_checkpoint_samples(tiny_ckpts, capsys):
    """train.py --mixture 3 --learned-var --T 10 writes a checkpoint that rebuilds the mixture U-Net,
    samples deterministically per seed with both samplers, and reports no eta-sensitivity (no latent)."""
    model, diffusion, config = load_checkpoint(tiny_ckpts["mixture"])
    assert model.components == 3 and model.config.learned_var and diffusion.T == 10
    for sampler in ("ddpm", "ddim"):
        gen = lambda seed: sample.generate(model, diffusion, 3, steps=5, sampler=sampler, seed=seed, progress=False)
        a, b = gen(0), gen(0)
        assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    sample.main(["--ckpt", tiny_ckpts["mixture"], "--n", "2"])
    assert "eta-sensitivity" not in capsys.readouterr().out
