"""
fid.py -- FID (Frechet Inception Distance) between two sets of images, with inception.py's
port of the TF Inception. Needs numpy, scipy, torch, pillow (and torchvision for downloading
datasets). tests/test_fid.py proves it equal to pytorch-fid.

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
~/.cache/smd/fid_stats/. Weights: see inception.py (--weights PATH offline).

Fewer than 2048 images give a rank-deficient covariance and a biased-high FID that is not
comparable to published numbers (stats() warns): use 10k-50k images and report N.
"""
import argparse
import os
import sys
import warnings

import numpy as np
import torch
from PIL import Image
from scipy import linalg

import data  # the datasets as train.py reads them
from inception import features, load_inception

STATS_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "smd", "fid_stats")

# -----------------------------------------------------------------------------
# The distance


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
        data.atomic_write(cache, lambda f: np.savez(f, mu=mu, sigma=sigma, n=n))
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
        data.atomic_write(b, lambda f: np.savez_compressed(f, mu=mu1, sigma=s1))
        print(f"saved statistics of {a} (N={n1}) to {b}")
        return
    mu2, s2, n2 = input_stats(b, model, args)
    fid = frechet_distance(mu1, s1, mu2, s2)
    print(f"FID {a} (N={n1}) vs {b} (N={n2}): {fid:.4f}")
    return fid


if __name__ == "__main__":
    main()
