"""beyond/templates.py: the metrics on samples whose answer is known (data, exact mixture denoising,
the best Gaussian denoiser, blends of two templates), parameter matching, and a tiny
end-to-end run (CPU, seconds)."""

import json

import pytest
import torch

import smd
from beyond import templates as tp
from unet import UNet, n_params

pytestmark = pytest.mark.usefixtures("one_thread")


def test_templates_are_separated_images_in_range():
    assert tp.TEMPLATES.shape == (16, 256)
    assert tp.TEMPLATES.abs().max() <= 0.9
    d = torch.cdist(tp.TEMPLATES, tp.TEMPLATES) / 16 / tp.STD
    assert d[~torch.eye(16, dtype=torch.bool)].min() > 2 * tp.BLEND   # midpoints are > BLEND std from both


def test_data_scores_like_data():
    m = tp.metrics(tp.DATA.sample(4000, torch.Generator().manual_seed(0)))
    assert m["dist"] == pytest.approx(1.0, abs=0.01) and m["dist_clean"] == pytest.approx(1.0, abs=0.01)
    assert m["coverage"] == 16 and m["blended"] == 0 and m["tv"] < 0.05


def test_metrics_see_missing_templates_and_blends():
    g = torch.Generator().manual_seed(1)
    x = tp.DATA.sample(4000, g)
    _, k = tp.nearest_template(x)
    half = tp.metrics(x[k < 8])                                    # 8 of 16 templates only
    assert half["coverage"] == 8 and half["tv"] == pytest.approx(0.5, abs=0.03) and half["blended"] == 0
    i, j = torch.triu_indices(16, 16, 1)                           # every pair's average, plus pixel noise
    avg = (tp.TEMPLATES[i] + tp.TEMPLATES[j]) / 2 + tp.STD * torch.randn(len(i), 256, generator=g, dtype=torch.float64)
    m = tp.metrics(avg)
    assert m["blended"] == 1 and m["coverage"] == 0 and m["tv"] == 1 and m["dist_clean"] is None
    noisy = tp.metrics(x + 3 * tp.STD * torch.randn(x.shape, generator=g, dtype=x.dtype))   # right template, too noisy
    assert noisy["blended"] == 1 and noisy["dist"] == pytest.approx(10 ** 0.5, abs=0.05)


def test_exact_is_like_data_and_best_gaussian_blends_at_T2():
    d, g = smd.Diffusion(2), torch.Generator().manual_seed(2)
    exact = tp.metrics(tp.DATA.sample_exact(d, 2000, generator=g))
    assert exact["dist"] == pytest.approx(1.0, abs=0.02) and exact["blended"] < 0.01
    assert exact["coverage"] == 16 and exact["tv"] < 0.07
    x_T = torch.randn(2000, 1, 16, 16, generator=g, dtype=torch.float64)
    x = d.sample(tp.DATA.best_gaussian_model(d), x_T.shape, var="small", generator=g, x_T=x_T)
    gauss = tp.metrics(x)
    assert gauss["blended"] > 0.9 and gauss["coverage"] < 4                # Theorem 3.1's bottleneck


def test_models_are_matched_and_the_gap_of_the_best_gaussian_is_zero():
    args = tp.get_parser().parse_args([])
    specs = tp.model_specs(args)
    target = n_params(UNet(specs["vanilla"][0]))
    assert [c.ch for c, _ in specs.values()] == [14, 12, 14]   # the even widths with the closest counts
    for name, (cfg, _) in specs.items():
        assert abs(n_params(tp.build(cfg)) / target - 1) < 0.13, name
    d = smd.Diffusion(5)
    best = tp.DATA.best_gaussian_model(d)
    assert tp.gap_to_best_gaussian(lambda x, t, eta=None: best(x.double(), t).float(), d, 64,
                                   torch.Generator().manual_seed(3))[0] < 1e-8


def test_tiny_end_to_end(tmp_path, capsys, monkeypatch):
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    calls, split = [], tp.CategoricalDiffusion.split_blends
    monkeypatch.setattr(tp.CategoricalDiffusion, "split_blends", lambda *a: calls.append(a[2].shape) or split(*a))
    tp.main(["--T", "2", "--max-steps", "3", "--batch-size", "8", "--n", "64", "--ch", "8", "--latent-dim", "4",
             "--components", "3", "--split", "--json", str(out), "--png", str(png)])
    assert calls == [(512, 1, 16, 16)]   # --split: once (step 2 of 3), for the categorical model only
    res = json.loads(out.read_text())
    names = {(r["model"], r["T"]) for r in res["rows"]}
    assert names == {("data", 0), *((n, 2) for n in ("exact mixture", "best Gaussian", "vanilla", "SMD",
                                                      "categorical K=3"))}
    assert res["models"]["SMD T=2"]["eta_sens"] is not None and png.stat().st_size > 1000
    assert "categorical K=3" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["--T", "1"], "--T 1: a chain needs at least 2 steps"), (["--batch-size", "0"], "--batch-size: 0"),
    (["--n", "3"], "--n: 3 is out of range"), (["--var", "tiny"], "--var: invalid choice"),
    (["--json", "/nonexistent/r.json"], "--json /nonexistent/r.json: the folder"),
    (["--mean-loss", "-0.5"], "--mean-loss: -0.5"),
])
def test_bad_flags_refused_before_training(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(tp, "run_T", lambda *a: pytest.fail("trained before checking its flags"))
    with pytest.raises(SystemExit) as e:
        tp.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("python -m beyond.templates: ") and err.count("\n") == 1 and says in err, err
