"""
fid.py -- FID (Frechet Inception Distance) between two sets of images, with inception.py's
port of the TF Inception. Needs numpy, torch, pillow (and torchvision for downloading
datasets). tests/test_fid.py proves it equal to pytorch-fid.

    python fid.py samples.npz cifar10:train                   # samples vs CIFAR-10 train
    python fid.py samples.npz fashion-mnist:test --limit 10000
    python fid.py samples16.npz fashion-mnist:test --image-size 16   # the data at the samples' 16x16
    python fid.py path/to/images/ path/to/other_images/       # two folders of images
    python fid.py samples.npz samples_stats.npz --save-stats  # write mu/sigma of the first
    python fid.py a.npz b.npz --weights pt_inception-2015-12-05-6726825d.pth --device cuda

An input is an .npz of uint8 NHWC images (sample.py's format; the array 'images' if present,
else the first array), an .npz of statistics 'mu'/'sigma' (pytorch-fid's format; N is read from
an 'n' array if there is one, as --save-stats writes it), a folder of images of one size, or a
dataset: cifar10, mnist, fashion-mnist, with :train (default) or :test, loaded by data.py as the
models see it (28x28 padded to 32x32; --image-size 16 or 8 average-pools it, as train.py does)
from --data-dir or, for Fashion-MNIST, Debian's /usr/share/datasets/fashion-mnist/. Their
statistics are cached in ~/.cache/smd/fid_stats/. Two statistics files need no Inception.
Weights: see machinery/inception.py (--weights PATH offline).

Every flag, input and output path is checked, and both inputs are opened (a dataset's images
read, unless its statistics are cached; an input of fewer than 2 images is refused), before the
Inception is loaded; a refusal is one line on stderr with exit status 2. --save-stats replaces an
existing file only with --force. Two inputs of different image sizes or channels get a warning
(the Inception resizes everything to 299x299 and repeats gray to RGB, but the distance then
compares unlike sets). Progress (images/s, ETA) goes to stderr; Ctrl-C stops in one line.
Fewer than 2048 images give a rank-deficient covariance and a biased-high FID that is not
comparable to published numbers (stats() warns): use 10k-50k images, report N.
"""
import glob
import os
import sys
import warnings
import zipfile

import numpy as np
import torch
from PIL import Image

from machinery import cli, data   # data: the datasets as train.py reads them
from machinery.inception import FID_WEIGHTS_URL, features, load_inception

PROG = "fid.py"
STATS_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "smd", "fid_stats")

# -----------------------------------------------------------------------------
# The distance


def stats(feats):
    """Mean and covariance of features, as pytorch-fid computes them."""
    n, d = feats.shape
    if n < 2:  # the covariance of one image is NaN (and sqrtm of NaN never returns)
        raise ValueError(f"{n} image(s): FID needs at least 2 images for a covariance, ideally >= 2048")
    if n < d:
        warnings.warn(f"FID statistics from N={n} < {d} images: the covariance is rank-"
                      f"deficient and FID is biased high, not comparable to published numbers "
                      f"(use >= 10k images; 50k is the standard)", stacklevel=2)
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)). Tr sqrt(S1 S2) is computed as the sum of the
    square roots of the eigenvalues of R S2 R, R = sqrt(S1) (similar to S1 S2, and symmetric):
    two symmetric eigendecompositions, exact for the positive semi-definite covariances FID has
    (rank-deficient ones too), 5-6x faster than scipy's sqrtm that pytorch-fid calls (equal to it
    within 1e-6 at 2048 dimensions) and free of its hang on non-finite input."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    if not all(np.isfinite(a).all() for a in (diff, sigma1, sigma2)):
        raise ValueError("FID statistics with NaN or inf (a covariance of fewer than 2 images?): "
                         "recompute them from at least 2 images")
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(w.clip(0))) @ v.T                      # R = sqrt(S1)
    tr_covmean = np.sqrt(np.linalg.eigvalsh(root @ sigma2 @ root).clip(0)).sum()
    fid = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    return max(fid, 0.0)   # a distance: a set against itself gives rounding error around 0, not -1e-4


# -----------------------------------------------------------------------------
# Inputs: .npz of images or statistics, image folders, datasets


def input_kind(source):
    """"dataset", "folder" or "npz"; a ValueError saying what an input can be otherwise."""
    name, colon, split = source.partition(":")
    if name in data.DATASETS:
        if colon and split not in ("train", "test"):
            raise ValueError(f"{source}: unknown split {split!r}; use {name}:train or {name}:test")
        return "dataset"
    if os.path.isdir(source):
        return "folder"
    if os.path.isfile(source) and source.endswith(".npz"):
        return "npz"
    raise ValueError(f"{source}: {'not an .npz file' if os.path.exists(source) else 'no such file or folder'}; "
                     f"an input is an .npz of images or of mu/sigma, a folder of images, or a dataset "
                     f"name ({', '.join(data.DATASETS)}), optionally with :train or :test")


def check_images(x, where):
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        hint = " (NCHW? transpose to NHWC)" if x.ndim == 4 and x.shape[1] in (1, 3) else ""
        raise ValueError(f"{where}: expected uint8 images of shape (N, H, W, 3) or (N, H, W, 1), "
                         f"got {x.dtype} {x.shape}{hint}. Save samples as uint8 NHWC "
                         f"(0..255), as sample.py writes them")
    return x


def check_count(source, n):
    if n < 2:
        raise ValueError(f"{source}: {n} image(s); FID needs at least 2 images (a covariance), "
                         f"and >= 2048 for a full-rank one (10k-50k to compare with published numbers)")


def load_npz(path):
    """('stats', (mu, sigma)) or ('images', uint8 NHWC array) from an .npz file."""
    fix = "write it with numpy.savez, as sample.py --npz does"
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz file (a zip of .npy arrays); {fix}")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: unreadable .npz ({type(e).__name__}: {e}); {fix}") from None
    if "mu" in arrays or "sigma" in arrays:
        if not ("mu" in arrays and "sigma" in arrays):
            raise ValueError(f"{path}: FID statistics need both 'mu' and 'sigma', found {list(arrays)}")
        mu, sigma = arrays["mu"], arrays["sigma"]
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or mu.dtype.kind + sigma.dtype.kind != "ff":
            raise ValueError(f"{path}: 'mu' must be floats of shape (D,) and 'sigma' (D, D), got "
                             f"{mu.dtype} {mu.shape} and {sigma.dtype} {sigma.shape}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"{path}: statistics with NaN or inf (from fewer than 2 images?); "
                             f"recompute them from at least 2 images")
        return "stats", (mu, sigma, int(arrays["n"]) if "n" in arrays else None)
    if not arrays:
        raise ValueError(f"{path}: empty .npz; expected uint8 NHWC images ('images') "
                         f"or FID statistics ('mu' and 'sigma')")
    key = "images" if "images" in arrays else next(iter(arrays))
    where = f"{path}['{key}']" + ("" if key == "images" else " (no 'images' array: the first one is read)")
    images = check_images(arrays[key], where)
    if key != "images":
        print(f"{path}: no 'images' array; read the first one, '{key}' {images.shape}", file=sys.stderr)
    return "images", images


def image_files(folder):
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.lower().endswith(data.IMAGE_EXTS))
    if not files:
        raise ValueError(f"{folder}: no images ({' '.join(data.IMAGE_EXTS)}) in this folder")
    return files


def read_batch(paths):  # runs in the DataLoader workers
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])  # as pytorch-fid


def folder_batches(files, batch_size, workers=0):
    """uint8 NHWC batches of the images in `files`, after checking that all have one size."""
    sizes = {}
    for path in files:
        with Image.open(path) as im:  # reads the header only
            sizes.setdefault(im.size, path)
    if len(sizes) > 1:
        raise ValueError("images of different sizes in one folder (" + ", ".join(
            f"{w}x{h}: {p}" for (w, h), p in sizes.items()) + "); resize them to one size first")
    return torch.utils.data.DataLoader(files, batch_size, num_workers=workers, collate_fn=read_batch)


def dataset_images(name, split, data_dir, size=32):
    """A dataset split as uint8 NHWC through data.py, as the models see it (28x28 zero-padded
    to 32x32, average-pooled to `size`), so that samples and reference statistics are made alike."""
    try:
        images = data.load_images(name, data_dir, split, size)
    except RuntimeError as e:  # not on disk, and the download failed
        raise OSError(str(e)) from None
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def image_stats(model, images, n, source, args):
    feats = features(model, images, args.batch_size, args.device, args.tf32, progress=source, total=n)
    return (*stats(feats), len(feats))


def cache_path(source, args, tag="*"):
    """Where a dataset split's statistics are cached, for the weights named `tag`."""
    name, _, split = source.partition(":")
    px = "" if args.image_size == 32 else f"-{args.image_size}px"
    return os.path.join(STATS_CACHE, f"{name}-{split or 'train'}{px}-{args.limit or 'all'}-{tag}.npz")


def read_dataset(source, args):
    name, _, split = source.partition(":")
    images = dataset_images(name, split or "train", args.data_dir, args.image_size)[:args.limit]
    check_count(source, len(images))
    return images


def dataset_stats(model, source, images, args):
    """(mu, sigma, N) of a dataset split: from the cache, else computed from its images (read
    already, or now) and cached."""
    tag = os.path.splitext(os.path.basename(model.source))[0] + ("-tf32" if args.tf32 else "")
    cache = cache_path(source, args, tag)
    if os.path.isfile(cache):
        print(f"{source}: cached statistics {cache}", file=sys.stderr)
        with np.load(cache) as f:
            return f["mu"], f["sigma"], int(f["n"])
    images = read_dataset(source, args) if images is None else images
    mu, sigma, n = image_stats(model, images, len(images), source, args)
    try:
        os.makedirs(STATS_CACHE, exist_ok=True)
        data.atomic_write(cache, lambda f: np.savez(f, mu=mu, sigma=sigma, n=n))
    except OSError as e:  # a cache, not a result: go on without it
        print(f"{source}: statistics not cached ({e})", file=sys.stderr)
    return mu, sigma, n


def open_input(source, args):
    """Check one input and load what can be loaded without the Inception: a dataset's images are
    read now, so a missing one is named before any features are computed. Returns (D, shape,
    get_stats): the statistics' size, the images' (H, W, C) (None for statistics) and
    get_stats(model) -> (mu, sigma, N), N None for a statistics file that does not hold it; a
    statistics file's get_stats is None: it needs no Inception."""
    kind = input_kind(source)
    if kind == "dataset":   # read now, unless statistics are cached (for some weights: then maybe later)
        images = None if glob.glob(cache_path(source, args)) else read_dataset(source, args)
        return 2048, None if images is None else images.shape[1:], \
            lambda model: dataset_stats(model, source, images, args)
    if kind == "folder":
        files = image_files(source)[:args.limit]
        check_count(source, len(files))
        with Image.open(files[0]) as im:
            shape = (im.size[1], im.size[0], 3)   # read as RGB
        images, n = folder_batches(files, args.batch_size, args.workers), len(files)
    else:
        what, loaded = load_npz(source)
        if what == "stats":
            return len(loaded[0]), None, loaded
        images = loaded[:args.limit]
        check_count(source, len(images))
        n, shape = len(images), images.shape[1:]
    return 2048, shape, lambda model: image_stats(model, images, n, source, args)

# -----------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    """The flags, with every input and the output path checked: nothing is loaded yet."""
    p = cli.Parser(__doc__, prog=PROG)
    p.add_argument("inputs", nargs=2, metavar="INPUT",
                   help=".npz (images or mu/sigma), folder of images, or dataset[:train|:test]")
    p.add_argument("--weights", help="pytorch-fid's .pth or a TorchScript .pt (None: downloaded by torch.hub)")
    p.add_argument("--data-dir", default="data", help="where the datasets are (or get downloaded)")
    p.add_argument("--batch-size", type=cli.positive_int, default=200, help="images per Inception batch")
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda if this machine has it, else cpu")
    p.add_argument("--workers", type=cli.nonneg_int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader workers reading a folder of images")
    p.add_argument("--limit", type=cli.positive_int, help="use only the first N >= 2 images of each input")
    p.add_argument("--image-size", type=int, choices=data.NAMED_SIZES, default=32,
                   help="a dataset input's size: 32, or average-pooled to 16 or 8 as train.py --image-size does")
    p.add_argument("--tf32", action="store_true", help="allow TF32 on Ampere+ (faster, FID changes slightly)")
    p.add_argument("--save-stats", action="store_true", help="write mu/sigma of the first input to the second (.npz)")
    p.add_argument("--force", action="store_true", help="with --save-stats: replace an existing file")
    args = p.parse_args(argv)
    a, b = args.inputs
    if args.limit == 1:
        cli.fail(PROG, "--limit 1: FID needs at least 2 images (a covariance), ideally >= 2048; "
                       "give --limit 2 or more")
    if args.weights is not None and not os.path.isfile(args.weights):
        cli.fail(PROG, f"--weights {args.weights}: no such file; download {FID_WEIGHTS_URL} and pass its "
                       f"path, or leave out --weights to download it through torch.hub")
    if args.save_stats:
        if not b.endswith(".npz"):
            cli.fail(PROG, f"--save-stats: {b} must end in .npz (fid.py reads statistics from .npz files)")
        cli.output_file(PROG, b, "--save-stats", args.force)
    for source in [a] if args.save_stats else [a, b]:
        try:
            input_kind(source)
        except ValueError as e:
            cli.fail(PROG, str(e))
    return args


def main(argv=None):
    with cli.one_line_interrupt(PROG):
        return compute(parse_args(argv))


def compute(args):
    a, b = args.inputs
    if torch.device(args.device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        opened = [open_input(s, args) for s in ([a] if args.save_stats else [a, b])]  # both, before the Inception
        sizes, shapes = [size for size, _, _ in opened], [shape for _, shape, _ in opened]
        if len(set(sizes)) > 1:
            raise ValueError(f"{a} and {b} hold statistics of different sizes ({sizes[0]} and {sizes[1]}); "
                             f"compare like with like")
        if None not in shapes and len(set(map(tuple, shapes))) > 1:
            hint = "; for a dataset input, --image-size 16 or 8 pools it to the samples' size" \
                if any(input_kind(x) == "dataset" for x in (a, b)) else ""
            warnings.warn(f"{a} holds {'x'.join(map(str, shapes[0]))} images, {b} "
                          f"{'x'.join(map(str, shapes[1]))} (height x width x channels): the Inception resizes both "
                          f"to 299x299 RGB, but FID between unlike sets measures the difference too{hint}",
                          stacklevel=1)
        needs = [get for _, _, get in opened if callable(get)]   # a statistics file's are loaded already
        model = load_inception(args.weights, args.device) if needs else None
        (mu1, s1, n1), *second = [get(model) if callable(get) else get for _, _, get in opened]
        if args.save_stats:
            data.atomic_write(b, lambda f: np.savez(f, mu=mu1, sigma=s1, n=n1))  # zlib: 4% smaller, 50x slower
            print(f"saved statistics of {a} (N={n1}) to {b}")
            return None
        mu2, s2, n2 = second[0]
        fid = frechet_distance(mu1, s1, mu2, s2)
    except (ValueError, OSError) as e:  # the inputs' contents, the weights, the disk: one line
        cli.fail(PROG, " ".join(str(e).split()))
    count = lambda n: f"N={n}" if n is not None else "N not stored"
    print(f"FID {a} ({count(n1)}) vs {b} ({count(n2)}): {fid:.4f}")
    return fid


if __name__ == "__main__":
    main()
