"""beyond/toy.py: the importance-weighted bound against the paper's loss, and a tiny end-to-end
run of every model beyond the paper on toy.py's 7x7 mixture (CPU, seconds)."""

import json

import pytest
import torch

import smd
import toy
from beyond import toy as beyond_toy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_iwae_loss_is_the_paper_loss_when_the_latent_is_unused_and_tighter_otherwise():
    d = smd.Diffusion(1000)
    model = toy.Denoiser(32, 2, latent_dim=4)            # f_phi is zero-initialised: eta is ignored
    x0 = toy.DATA.sample(256).float()
    torch.manual_seed(0)
    jensen = d.loss(model, x0)
    torch.manual_seed(0)                                 # same t and eps: same x_t
    iwae = beyond_toy.iwae_loss(model, d, x0, eta_samples=4)
    assert iwae.item() == pytest.approx(jensen.item(), rel=1e-4)

    class Spread(torch.nn.Module):                       # predictions that differ across eta
        latent_dim = 2

        def forward(self, x, t, eta):
            return x + eta
    torch.manual_seed(0)
    iwae = beyond_toy.iwae_loss(Spread(), d, x0, eta_samples=4)
    torch.manual_seed(0)
    jensen = d.loss(Spread(), x0, eta_samples=4)         # the same eta draws: the K=4 Jensen bound
    assert iwae.item() < jensen.item()


def test_tiny_end_to_end(tmp_path, capsys):
    out, png = tmp_path / "toy.json", tmp_path / "toy.png"
    beyond_toy.main(["--T", "10", "--steps", "10,5", "--max-steps", "20", "--n", "500", "--ch", "32",
                     "--models", "vanilla,smd,iwae,categorical,categorical-var", "--eta-samples", "2",
                     "--components", "4", "--json", str(out), "--png", str(png)])
    res = json.loads(out.read_text())
    names = {(r["model"], r["var"], r["steps"]) for r in res["rows"]}
    for name in ("exact mixture", "best Gaussian", "vanilla", "SMD", "SMD-iwae", "SMD-iwae eta=0",
                 "categorical K=4", "categorical K=4, learned var"):
        assert any(n[0] == name and n[2] == 5 for n in names), name
    assert {n[1] for n in names if n[0].startswith("categorical")} == {"small"}   # sampled as trained
    params = {k: v["params"] for k, v in res["models"][0].items()}
    for name in ("SMD", "categorical K=4", "categorical K=4, learned var"):   # matched within 10%
        assert abs(params[name] / params["vanilla"] - 1) < 0.1, params
    assert png.stat().st_size > 1000
    assert "SMD-iwae" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["--models", "vanilla,iwae", "--batch-size", "4"], "--batch-size 4: iwae needs at least --eta-samples 8 rows"),
    (["--anneal", "0.5"], "--anneal: 0.5 is out of range"), (["--models", "mixture"], "--models: 'mixture'"),
])
def test_bad_flags_refused_before_training(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(toy, "run", lambda *a: pytest.fail("trained before checking its flags"))
    with pytest.raises(SystemExit) as e:
        beyond_toy.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("python -m beyond.toy: ") and err.count("\n") == 1 and says in err, err
