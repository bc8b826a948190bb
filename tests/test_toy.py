"""toy.py: the exact references against the data, the metrics, parameter matching, refusals
before training, and a tiny end-to-end run (CPU, well under a minute). The closed forms
themselves are tested in test_gmm.py; the models beyond the paper in tests/beyond/test_toy.py."""

import json
import math

import pytest
import torch

import smd
import toy
from unet import matched_width, n_params

pytestmark = pytest.mark.usefixtures("one_thread")
ENTROPY = math.log(49) + 1 + math.log(2 * math.pi * toy.STD**2)   # H[q(x_0)] for separated modes


def test_references_match_the_data_at_1000_steps_and_only_exact_survives_5():
    d = smd.Diffusion(1000)
    g = torch.Generator().manual_seed(0)
    exact = toy.metrics(toy.DATA.sample_exact(d, 4000, 1000, g))
    gauss = toy.metrics(d.sample(toy.DATA.best_gaussian_model(d), (4000, 2), steps=1000, var="large",
                                 generator=g, x_T=torch.randn(4000, 2, dtype=torch.float64, generator=g)))
    for m in (exact, gauss):   # 4000 samples: NLL's standard error ~1 / sqrt(4000) = 0.016, precision's 0.002
        assert m["precision"] > 0.97 and m["coverage"] == 49 and m["tv"] < 0.08
        assert m["nll"] == pytest.approx(ENTROPY, abs=0.07) and m["spread"] == pytest.approx(1, abs=0.05)
    exact5 = toy.metrics(toy.DATA.sample_exact(d, 4000, 5, g))
    gauss5 = toy.metrics(d.sample(toy.DATA.best_gaussian_model(d), (4000, 2), steps=5, var="large",
                                  generator=g, x_T=torch.randn(4000, 2, dtype=torch.float64, generator=g)))
    assert exact5["precision"] > 0.97 and exact5["coverage"] == 49
    assert gauss5["precision"] < 0.5 and gauss5["nll"] > ENTROPY + 5      # Theorem 3.1's bottleneck


def test_metrics_score_true_samples_well_and_corrupted_ones_badly():
    g = torch.Generator().manual_seed(1)
    x = toy.DATA.sample(10_000, g)
    good = toy.metrics(x)   # 10k samples: standard errors ~0.01 (NLL) and 0.001 (precision): > 4 of them
    assert good["nll"] == pytest.approx(ENTROPY, abs=0.04)
    assert good["precision"] == pytest.approx(1 - math.exp(-4.5), abs=0.005)   # P(chi2_2 < 9)
    assert good["coverage"] == 49 and good["tv"] < 0.05 and good["spread"] == pytest.approx(1, abs=0.03)
    shifted = toy.metrics(x + toy.SPACING / 2)
    assert shifted["precision"] < 0.01 and shifted["nll"] > ENTROPY + 10
    blurred = toy.metrics(x + 2 * toy.STD * torch.randn(x.shape, dtype=x.dtype, generator=g))
    assert blurred["precision"] < 0.65 and blurred["nll"] > ENTROPY + 1 and blurred["spread"] > 1.2
    half = toy.metrics(x[torch.cdist(x, toy.MEANS).argmin(1) < 24])           # 24 of 49 modes only
    assert half["coverage"] == 24 and half["tv"] == pytest.approx(25 / 49, abs=0.03)
    collapsed = toy.metrics(toy.MEANS[torch.randint(0, 49, (10_000,), generator=g)])
    assert collapsed["spread"] < 1e-3 and collapsed["nll"] < ENTROPY   # why NLL alone is not enough


def test_param_matching_and_eta_zero():
    m = toy.Denoiser(64, 3, latent_dim=8)
    w = matched_width(n_params(m), lambda w: toy.Denoiser(w, 3))
    assert abs(n_params(toy.Denoiser(w, 3)) - n_params(m)) < 0.1 * n_params(m)
    x, t = torch.randn(5, 2), torch.randint(0, 1000, (5,))
    torch.testing.assert_close(toy.eta_zero(m, 5)(x, t), m(x, t, torch.zeros(5, 8)))


def test_tiny_end_to_end(tmp_path, capsys):
    out, png = tmp_path / "toy.json", tmp_path / "toy.png"
    toy.main(["--T", "10", "--steps", "10,5", "--max-steps", "20", "--n", "500", "--ch", "32",
              "--json", str(out), "--png", str(png)])
    res = json.loads(out.read_text())
    names = {(r["model"], r["var"], r["steps"]) for r in res["rows"]}
    for name in ("exact mixture", "best Gaussian", "vanilla", "SMD", "SMD eta=0"):
        assert any(n[0] == name and n[2] == 5 for n in names), name
    params = {k: v["params"] for k, v in res["models"][0].items()}
    assert abs(params["SMD"] / params["vanilla"] - 1) < 0.1, params   # matched within 10%
    assert png.stat().st_size > 1000 and "step 18/20" in capsys.readouterr().out   # progress of training
    with pytest.raises(SystemExit):   # no silent overwrite
        toy.main(["--T", "10", "--steps", "10", "--max-steps", "2", "--n", "50", "--png", str(png)])
    assert "toy.png exists: pass --force" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--T", "10", "--steps", "20"], "--steps 20: a sampler takes between 2 and --T 10 steps"),
    (["--T", "5", "--steps", "1"], "--steps 1: a sampler takes between 2 and --T 5 steps"),
    (["--var", "medium"], "--var: 'medium'"), (["--batch-size", "0"], "--batch-size: 0"), (["--n", "0"], "--n: 0"),
    (["--models", "iwae"], "--models: 'iwae'"),   # beyond the paper: python -m beyond.toy
    (["--json", "/nonexistent/dir/r.json"], "--json /nonexistent/dir/r.json: the folder"),
    (["--png", "/nonexistent/t.png"], "--png /nonexistent/t.png: the folder"),
    (["--png", "/proc/t.png"], "--png /proc/t.png: cannot write in /proc"),
    (["--png", "t.jpg"], "--png t.jpg: the format comes from the extension"),
])
def test_bad_flags_refused_before_training(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(toy, "run", lambda *a: pytest.fail("trained before checking its flags"))
    with pytest.raises(SystemExit) as e:
        toy.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("toy.py: ") and err.count("\n") == 1 and says in err, err
