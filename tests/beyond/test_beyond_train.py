"""beyond/train.py: the categorical model trained on an image dataset through train.py's machinery,
its checkpoint loaded and sampled by sample.py, which names no model beyond the paper."""

import numpy as np
import pytest
import torch

import sample
from beyond import train as beyond_train
from machinery.checkpoint import load_checkpoint
from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_checkpoint_names_its_model(tiny_ckpts):
    ckpt = torch.load(tiny_ckpts["categorical"], weights_only=True)
    assert ckpt["model_class"] == "beyond.categorical.CategoricalUNet"
    assert ckpt["diffusion_class"] == "beyond.categorical.CategoricalDiffusion"
    assert ckpt["model_config"]["components"] == 3 and ckpt["model_config"]["learned_var"]


def test_categorical_checkpoint_samples(tiny_ckpts, tmp_path, capsys):
    """python -m beyond.train --components 3 --learned-var --T 10 writes a checkpoint that rebuilds the
    categorical U-Net, samples deterministically per seed with both samplers, and reports no
    eta-sensitivity."""
    model, diffusion, config = load_checkpoint(tiny_ckpts["categorical"])
    assert model.components == 3 and model.config.learned_var and diffusion.T == 10
    for sampler in ("ddpm", "ddim"):
        gen = lambda seed: sample.generate(model, diffusion, 3, steps=5, update=sample.step_update(sampler), seed=seed,
                                           progress=False)
        a, b = gen(0), gen(0)
        assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    sample.main(["--ckpt", tiny_ckpts["categorical"], "--n", "2", "--grid", str(tmp_path / "g.png"),
                 "--eta-sensitivity", "4"])
    out = capsys.readouterr().out
    assert "note: --eta-sensitivity has no effect" in out and "eta-sensitivity 0" not in out


def test_a_checkpoint_naming_code_from_elsewhere_is_refused(tiny_ckpts, tmp_path):
    ckpt = torch.load(tiny_ckpts["categorical"], weights_only=True)
    for name in ("os.system", "torch.nn.Linear", "nowhere.Model"):
        torch.save({**ckpt, "model_class": name}, tmp_path / "x.pt")
        with pytest.raises(ValueError, match=f"names the class '{name}', which is not a model of this repository"):
            load_checkpoint(str(tmp_path / "x.pt"))


@pytest.mark.parametrize("argv, says", [
    (["--smd"], "--smd: not for the categorical model"), (["--eta-samples", "2"], "--eta-samples: not for"),
    (["--init", "google/ddpm-cifar10-32"], "--init: not for"), (["--anneal", "0.5"], "--anneal: 0.5 is out of range"),
    (["--components", "0"], "--components: 0 is out of range"),
])
def test_refusals(argv, says, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        beyond_train.main(["--out-dir", str(tmp_path / "out"), *TINY, *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("python -m beyond.train: ") and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "out").exists()
