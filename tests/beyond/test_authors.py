"""beyond/authors.py: the authors' g_xi and f_phi around the U-Net (shapes, their matrix product,
eta used from initialisation where ours starts unused), trained by beyond/train.py --model authors
and sampled by sample.py, which names no model beyond the paper; beyond/fashion.py's extra arms,
eta-sensitivity curve and portable JSON; and docs/authors-smd.md's table recomputed from its JSONs."""

import glob
import os

import pytest
import torch

import sample
import smd
from beyond import authors, fashion
from beyond import train as beyond_train
from beyond.categorical import train_loop
from machinery.checkpoint import load_checkpoint
from conftest import ROOT, TINY, write_cifar10
from unet import UNet, UNetConfig, n_params

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_res=(), dropout=0.0, norm_groups=4)


@pytest.mark.parametrize("size, channels", [(16, 1), (32, 3)])
def test_shapes(size, channels):
    model = authors.AuthorsUNet(authors.AuthorsConfig(image_size=size, channels=channels, **SMALL))
    c = model.config
    assert model.latent_dim == c.latent_dim == channels * size * size   # eta has the image's shape
    assert (c.id_ch, c.latent_ch) == (4, 6)                               # 8 / 4 and round(100 * 8 / 128)
    x, t = torch.randn(3, channels, size, size), torch.tensor([0, 4, 9])
    eta = torch.randn(3, model.latent_dim)
    assert model.g_xi(torch.cat([x, eta.view(x.shape)], 1), t).shape == (3, 6, size, size)   # z per pixel
    assert model(x, t, eta).shape == x.shape
    with pytest.raises(ValueError, match="needs eta"):
        model(x, t)


def test_hypernet_is_the_authors_matrix_product():
    """u (u.r) + s r equals their per-pixel (u u^T + softplus(s) I) @ r, layer after layer."""
    f = authors.HyperNet(ch=5, latent_ch=4, layers=2)
    h, z = torch.randn(2, 5, 3, 3), torch.randn(2, 4, 3, 3)
    r, zz = f.inp(h.permute(0, 2, 3, 1)).unsqueeze(-1), z.permute(0, 2, 3, 1)
    for A, s in zip(f.u, torch.nn.functional.softplus(f.s)):
        u = A(zz)
        r = (u.unsqueeze(-1) @ u.unsqueeze(-2) + s * torch.eye(4)) @ r
    assert torch.allclose(f(h, z), f.outp(r.squeeze(-1)).permute(0, 3, 1, 2), atol=1e-5)


def test_eta_moves_the_authors_model_at_initialisation_and_not_ours():
    """At step 0 the authors' eps_hat depends on eta; ours does not even with every conv random
    (only f_phi's zero last layer left), until fashion.random_f_phi (the smd-random arm)."""
    torch.manual_seed(0)
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    theirs = authors.AuthorsUNet(authors.AuthorsConfig(image_size=16, channels=1, **SMALL))
    e1, e2 = (theirs(x, t, torch.randn(4, theirs.latent_dim)) for _ in range(2))
    assert (e1 - e2).abs().mean() > 1e-2 * e1.abs().mean()
    d = smd.Diffusion(5)
    assert smd.eta_sensitivity(theirs, d, x.clamp(-1, 1))[0] > 1e-3
    ours = UNet(UNetConfig(image_size=16, channels=1, smd=True, latent_dim=8, **SMALL))
    assert smd.eta_sensitivity(ours, d, x.clamp(-1, 1))[0] == 0
    for m in ours.modules():   # undo DDPM's zero-initialised convs: only f_phi's zero last layer remains
        if isinstance(m, torch.nn.Conv2d):
            m.reset_parameters()
    eta = torch.randn(2, 4, 8)
    assert torch.equal(ours(x, t, eta[0]), ours(x, t, eta[1]))
    fashion.random_f_phi(ours, 1)
    assert not torch.allclose(ours(x, t, eta[0]), ours(x, t, eta[1]))


def test_fashion_arms_are_matched_and_the_curve_leaves_training_alone():
    specs = fashion.model_specs(fashion.get_parser().parse_args(["--models", "vanilla,smd,smd-random,authors"]))
    assert list(specs) == ["vanilla", "SMD", fashion.SMD_RANDOM, "authors"]
    assert specs["SMD"] == specs[fashion.SMD_RANDOM] and specs["authors"][0].ch == 32   # closest to vanilla's count
    target = n_params(fashion.build(specs["vanilla"][0]))
    assert abs(n_params(fashion.build(specs["authors"][0])) / target - 1) < 0.05
    args = fashion.get_parser().parse_args(["--max-steps", "3", "--eta-curve", "2", "--batch-size", "4"])
    assert fashion.eta_points(1200, 10) == [0, 1, 12, 48, 108, 192, 300, 432, 588, 768, 972, 1200]
    images = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8)
    draw = lambda n, g: fashion.to_model(images[torch.randint(len(images), (n,), generator=g)])
    states = []
    for curve in (False, True):
        torch.manual_seed(0)
        model, diffusion = fashion.build(fashion.config(args, 8, authors=True)), smd.Diffusion(5)
        if curve:
            measure = lambda: smd.eta_sensitivity(model, diffusion, draw(4, torch.Generator()), n_t=2,
                                                  generator=torch.Generator().manual_seed(1))[0]
            got = fashion.train_with_curve(model, diffusion, draw, args, "", measure)[2]
            assert [s for s, _ in got] == [0, 1, 3] and all(v > 0 for _, v in got)
        else:
            train_loop(model, diffusion, draw, args)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_fashion_json_holds_no_absolute_path():
    args = fashion.get_parser().parse_args(["--out-dir", os.path.join(ROOT, "out", "x"), "--fid-weights",
                                            "/usr/lib/weights/default_1.pt", "--data-dir", "/usr/share/datasets"])
    args.json, args.png = os.path.join(ROOT, "out", "x", "r.json"), "/tmp/f.png"
    args.figure_from = [os.path.join(ROOT, "assets", "a.json"), "/tmp/b.json", "c.json"]
    got = fashion.data.portable(args)
    assert (got["out_dir"], got["json"], got["png"]) == ("out/x", "out/x/r.json", "f.png")
    assert got["figure_from"] == ["assets/a.json", "b.json", "c.json"]
    assert got["fid_weights"] == "default_1.pt" and not any(str(v).startswith("/") for v in got.values())


def test_authors_checkpoint_round_trips_through_sample_py(tmp_path, capsys):
    write_cifar10(tmp_path / "data")
    tiny = [a for i, a in enumerate(TINY) if "--latent-dim" not in TINY[max(0, i - 1):i + 1]]
    out = tmp_path / "run"
    argv = ["--model", "authors", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--out-dir", str(out),
            "--max-steps", "2", "--device", "cpu", *tiny]
    trained = beyond_train.main(argv)
    model, diffusion, info = load_checkpoint(str(out))
    assert type(model) is authors.AuthorsUNet and info["model_class"] == "beyond.authors.AuthorsUNet"
    assert type(diffusion) is smd.Diffusion and diffusion.T == 100 and model.latent_dim == 3 * 32 * 32
    assert all(torch.equal(v, trained["ema"].state_dict()[k]) for k, v in model.state_dict().items())
    sample.main(["--ckpt", str(out), "--n", "2", "--steps", "3", "--grid", str(tmp_path / "g.png"),
                 "--eta-sensitivity", "2"])
    assert "eta-sensitivity" in capsys.readouterr().out and (tmp_path / "g.png").exists()
    with pytest.raises(SystemExit) as e:
        beyond_train.main(argv[:-len(tiny)] + ["--out-dir", str(tmp_path / "no"), "--latent-dim", "8"])
    assert e.value.code == 2 and "--latent-dim: not for --model authors" in capsys.readouterr().err


def test_the_report_table_is_recomputed_from_its_jsons():
    """Every line of docs/authors-smd.md's table is authors.table of the JSONs in assets/authors/."""
    paths = sorted(glob.glob(os.path.join(ROOT, "assets", "authors", "*.json")))
    with open(os.path.join(ROOT, "docs", "authors-smd.md")) as f:
        doc = f.read()
    table = authors.table(authors.collect(paths))
    assert len(paths) >= 3 and table.count("\n") >= 4
    for line in table.splitlines():
        assert line in doc, line
