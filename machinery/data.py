"""
machinery/data.py -- images in and out: training batches from CIFAR-10, MNIST, Fashion-MNIST or an image
folder, and generated images to disk (uint8 NHWC grids and .npz files, written atomically).

Named datasets are read from torchvision's on-disk formats under --data-dir (downloaded by
torchvision only when the files are nowhere; Debian's dataset-fashion-mnist is found in
/usr/share/datasets/fashion-mnist). 28x28 images are zero-padded to 32x32 (and average-pooled to
16x16 or 8x8 with --image-size 16 or 8). Any folder of images is resized on its shorter side and
center-cropped, after every file was decoded once so that a broken one is named before training
starts. train.py draws its batches here; fid.py reads the same images for reference statistics;
sample.py saves through to_uint8.

    python -c "from machinery import data; print(data.load_images('fashion-mnist', 'data').shape)"
"""

import gzip
import json
import math
import os
import pickle
import signal
import struct
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

SYSTEM_DIRS = {"fashion-mnist": ["/usr/share/datasets/fashion-mnist"]}   # Debian's dataset-fashion-mnist
IMAGE_EXTS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")  # pytorch-fid's list
DATASETS = ("cifar10", "mnist", "fashion-mnist")


def read_idx(path):
    """An IDX file (the MNIST format), gzipped or not, as a numpy array."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        buf = f.read()
    ndim = buf[3]
    shape = struct.unpack(f">{ndim}I", buf[4:4 + 4 * ndim])
    return np.frombuffer(buf, np.uint8, offset=4 + 4 * ndim).reshape(shape)


# where each dataset's files come from, for the message of a failed download
SOURCES = {"cifar10": "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into {data_dir} "
                      "(tar xzf cifar-10-python.tar.gz -C {data_dir}: it makes {where})",
           "mnist": "put train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz from "
                    "https://ossci-datasets.s3.amazonaws.com/mnist/ into {where}",
           "fashion-mnist": "put train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz (and the -labels- "
                            "files) from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ into {where}, "
                            "or on Debian/Ubuntu install them: apt-get install dataset-fashion-mnist"}


def download(name, cls, data_dir, where):
    """Ask torchvision to download; offline, fail with a message saying what to fetch and where."""
    try:
        import torchvision   # only here: importing it costs seconds
        getattr(torchvision.datasets, cls)(data_dir, train=True, download=True)
    except Exception as e:
        raise RuntimeError(f"{name}: no data in {where}, and downloading it failed ({type(e).__name__}: {e}); "
                           + SOURCES[name].format(data_dir=data_dir, where=where)) from None


def load_mnist_like(name, data_dir, split="train", verbose=False):
    """MNIST / Fashion-MNIST images as (N, 1, 28, 28) uint8, from data_dir/<Class>/raw/ (plain
    or .gz, as torchvision leaves them), else a system copy, else a download."""
    folder = "MNIST" if name == "mnist" else "FashionMNIST"
    dirs = [os.path.join(data_dir, folder, "raw"), *SYSTEM_DIRS.get(name, [])]
    prefix = "train" if split == "train" else "t10k"
    files = [os.path.join(d, f"{prefix}-images-idx3-ubyte{gz}") for d in dirs for gz in ("", ".gz")]
    if not any(map(os.path.exists, files)):
        download(name, folder, data_dir, dirs[0])
    path = next(f for f in files if os.path.exists(f))
    if verbose:
        print(f"{name}: {split} images from {path}", flush=True)
    return read_idx(path)[:, None]


def load_cifar10(data_dir, split="train", verbose=False):
    """CIFAR-10's 50k training (or 10k test) images as (N, 3, 32, 32) uint8 from torchvision's
    python batches."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    files = [os.path.join(folder, n) for n in names]
    if not all(map(os.path.exists, files)):
        download("cifar10", "CIFAR10", data_dir, folder)
    if verbose:
        print(f"cifar10: {split} images from {folder}", flush=True)
    arrays = []
    for f in files:
        with open(f, "rb") as fh:
            arrays.append(pickle.load(fh, encoding="latin1")["data"])
    return np.concatenate(arrays).reshape(-1, 3, 32, 32)


NAMED_SIZES = (32, 16, 8)   # a named dataset's 32x32 images, or them average-pooled (2x2, 4x4)


def load_images(name, data_dir, split="train", size=32, verbose=False):
    """A named dataset's split ("train" or "test") as uint8 (N, C, size, size): 28x28 images are
    zero-padded to 32x32, as the models see them; size 16 or 8 average-pools those 32x32 images
    (2x2 or 4x4 blocks), rounded back to uint8."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or a folder of images")
    if size not in NAMED_SIZES:
        raise ValueError(f"{name} comes at --image-size {' | '.join(map(str, NAMED_SIZES))} (32x32, average-pooled), "
                         f"not {size}")
    x = load_cifar10(data_dir, split, verbose) if name == "cifar10" else load_mnist_like(name, data_dir, split, verbose)
    if x.shape[-1] == 28:
        x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    if size != 32:
        x = torch.nn.functional.avg_pool2d(torch.from_numpy(x).float(), 32 // size).round().to(torch.uint8).numpy()
    return np.ascontiguousarray(x)


def ignore_sigint(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the main process's business


GRAY_MODES = ("1", "L", "I", "I;16")   # PIL modes read as one channel


def probe(path):
    """(PIL mode, None) for an image that decodes whole, else (None, why). JPEGs decode at 1/8
    scale: every byte is still read, so a truncated file fails, in half the time."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            img.draft(mode, (1, 1))   # no-op for other formats
            img.load()
        return mode, None
    except Exception as e:   # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        return None, f"{type(e).__name__}: {e}"


def probe_files(files):
    return [probe(f) for f in files]


class ImageFolder(torch.utils.data.Dataset):
    """Every image under root (recursively, sorted), resized on its shorter side and center-
    cropped to size x size, as uint8 CHW. Items are addressed as (index, flip).

    Every file is decoded once here, in `workers` processes, so that a broken one stops the run
    before its first step, named, rather than mid-training when its batch comes up (skipping it
    instead would quietly train on other data than the folder holds). Measured on one busy core:
    2,000 generated 64x64 PNG/JPEG files take 0.5-0.7 s, 2,000 178x218 JPEGs (CelebA's size)
    0.8-1.0 s (1.5 s at full scale), so CelebA's 202,599 images cost about 1.5 core-minutes,
    spread over the workers: less than the decoding of one training epoch.
    Grayscale images in a folder with colour ones are converted to RGB, with one printed line."""

    def __init__(self, root, size, workers=0, verbose=False):
        every = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
        self.files = [f for f in every if f.lower().endswith(IMAGE_EXTS)]
        if not self.files:
            raise ValueError(f"{root}: no images ({' '.join(IMAGE_EXTS)}) found")
        others = {}
        for f in every:
            if not f.lower().endswith(IMAGE_EXTS):
                ext = os.path.splitext(f)[1].lower() or "(none)"
                others[ext] = others.get(ext, 0) + 1
        if verbose or others:
            kinds = ", ".join(f"{e}: {n}" for e, n in sorted(others.items()))
            skipped = f"; skipped {sum(others.values())} other files ({kinds}; read: {' '.join(IMAGE_EXTS)})"
            print(f"{root}: {len(self.files)} images{skipped if others else ''}", flush=True)
        self.size = size
        modes = self.readable_modes(root, workers)
        gray = sum(m in GRAY_MODES for m in modes)
        self.mode = "L" if gray == len(modes) else "RGB"
        self.channels = 1 if self.mode == "L" else 3
        if 0 < gray < len(modes):
            print(f"{root}: {gray} of {len(modes)} images are grayscale: converted to RGB, like the colour ones")

    def readable_modes(self, root, workers):
        """Every file's PIL mode; a ValueError naming the files that do not decode."""
        if len(self.files) >= 10_000:
            print(f"{root}: decoding all {len(self.files)} images once to find unreadable ones...", flush=True)
        loader = torch.utils.data.DataLoader(self.files, batch_size=256, num_workers=workers,
                                             collate_fn=probe_files, worker_init_fn=ignore_sigint)
        probes = [p for batch in loader for p in batch]
        bad = [f"{f} ({why})" for f, (_, why) in zip(self.files, probes) if why]
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise ValueError(f"{root}: {len(bad)} of {len(probes)} images cannot be read: {'; '.join(bad[:3])}{more}. "
                             f"Remove or replace them")
        return [mode for mode, _ in probes]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        i, flip = item
        img = ImageOps.fit(Image.open(self.files[i]).convert(self.mode), (self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.array(ImageOps.mirror(img) if flip else img))
        return x[None] if x.dim() == 2 else x.permute(2, 0, 1)


def epoch_order(n, seed, epoch):
    """One epoch's permutation of the n images and a flip bit per image (the same on every rank)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g), torch.rand(n, generator=g) < 0.5


def batch_plan(n, batch, rank, world, seed, step, device="cpu"):
    """Yields (indices, flips) of this rank's share of each global batch from `step` on. Each
    epoch is a fresh permutation cut into n // (batch * world) global batches; the order is a
    function of (seed, step) only, so a resumed run sees exactly the uninterrupted run's data."""
    check_batch_size(batch * world, world, n)
    per_epoch = n // (batch * world)
    epoch = None
    while True:
        e, j = divmod(step, per_epoch)
        if e != epoch:   # one host->device copy per epoch
            epoch, (perm, flip) = e, (v.to(device) for v in epoch_order(n, seed, e))
        i = (j * world + rank) * batch
        yield perm[i:i + batch], flip[i:i + batch]
        step += 1


def check_batch_size(batch_size, world, n=None):
    """A ValueError unless the global batch is a positive multiple of the ranks and, given the
    number of images n, no larger than the data: checked before anything is allocated."""
    if batch_size < 1 or batch_size % world:
        need = "a positive number" if world == 1 else f"a positive multiple of the {world} ranks"
        raise ValueError(f"batch size {batch_size}: use {need}")
    if n is not None and batch_size > n:
        raise ValueError(f"batch size {batch_size} is larger than the dataset ({n} images): use at most {n}")


def memory_batches(images, plan, flip):
    """Batches of a dataset held as one uint8 tensor on the device: gather and flip there."""
    for idx, fl in plan:
        x = images[idx]
        yield torch.where(fl[:, None, None, None], x.flip(3), x) if flip else x


def folder_batches(dataset, plan, flip, workers, device):
    """Batches of an image folder through a DataLoader (decode + resize in the workers)."""
    sampler = ([(i, f and flip) for i, f in zip(idx.tolist(), fl.tolist())] for idx, fl in plan)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=ignore_sigint)
    for x in loader:
        yield x.to(device, non_blocking=True)


def make_batches(dataset, data_dir, batch_size, image_size=None, flip=True, workers=4, seed=0, step=0,
                 rank=0, world=1, device="cpu", verbose=False):
    """(iterator of float batches in [-1, 1] on the device, channels, image size). batch_size is
    the global batch, split over `world` ranks; the batches continue the run at `step`. verbose:
    say where the images come from and how many there are."""
    device = torch.device(device)
    check_batch_size(batch_size, world)
    plan = lambda n, dev: batch_plan(n, batch_size // world, rank, world, seed, step, dev)
    if dataset in DATASETS:
        images = load_images(dataset, data_dir, size=image_size or 32, verbose=verbose)
        check_batch_size(batch_size, world, len(images))
        images = torch.from_numpy(images).to(device)
        uint8 = memory_batches(images, plan(len(images), device), flip)
        channels, size = images.shape[1], images.shape[-1]
    elif os.path.isdir(dataset):
        if image_size is not None and image_size < 1:
            raise ValueError(f"--image-size {image_size}: use a positive number of pixels (default 64)")
        folder = ImageFolder(dataset, image_size or 64, workers, verbose)
        check_batch_size(batch_size, world, len(folder))
        uint8 = folder_batches(folder, plan(len(folder), "cpu"), flip, workers, device)
        channels, size = folder.channels, folder.size
    else:
        raise ValueError(f"--dataset {dataset!r} is neither {'|'.join(DATASETS)} nor a folder of images")
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    floats = (x.float().div(127.5).sub(1).contiguous(memory_format=fmt) for x in uint8)
    return floats, channels, size

# -----------------------------------------------------------------------------
# images out


def to_uint8(x):
    """[-1, 1] NCHW floats -> uint8 NHWC, exactly as saved on disk (fid.py reads this)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


IMAGE_FORMATS = (".png", ".jpg", ".jpeg")   # what save_grid writes, chosen by the file's extension


def save_grid(images, path):
    """uint8 NHWC numpy images -> one PNG (or JPEG) grid, as square as possible, written atomically."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * cols, h, w, c), np.uint8)
    grid[:n] = images
    grid = grid.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    atomic_write(path, lambda f: image.save(f, format="PNG" if path.lower().endswith(".png") else "JPEG"))


def atomic_write(path, write):
    """write(f) into a fresh temporary file beside path, fsync, then os.replace: a crash leaves
    the old file intact, two writers never share a temporary file, and a failed write (disk full,
    read-only) removes its partial file before the error goes on. The file gets the permissions
    open() would give it (mkstemp's are owner-only)."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def portable(config):
    """A run's settings for a JSON that travels: an absolute path (alone or in a list) becomes
    relative to the repository if it lies inside it, else its file name; no machine's folders
    are written."""
    def fix(v):
        if isinstance(v, list):
            return [fix(x) for x in v]
        if not (isinstance(v, str) and os.path.isabs(v)):
            return v
        inside = os.path.commonpath([REPOSITORY, os.path.abspath(v)]) == REPOSITORY
        return os.path.relpath(v, REPOSITORY) if inside else os.path.basename(v)
    return {k: fix(v) for k, v in (vars(config) if hasattr(config, "__dict__") else config).items()}


def save_json(obj, path):
    """obj as indented JSON, written atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def save_npz(images, path):
    """images (uint8 NHWC) under the key 'images', written atomically."""
    atomic_write(path, lambda f: np.savez(f, images=images))


def figure(names, Ts, cell, caption, path, note=None, gap=12, left=130, top=22, foot=14):
    """A PNG of sample grids, one row per name and one column per chain length T: cell(name, T)
    is a PIL image or None (an empty cell), caption(name, T) the line under it, `note` a red line
    at the bottom. templates.py and fashion.py draw their figures with it."""
    cells = {(n, T): cell(n, T) for n in names for T in Ts}
    size = next(c.size[0] for c in cells.values() if c is not None)
    img = Image.new("RGB", (left + len(Ts) * (size + gap), top + len(names) * (size + foot + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for j, T in enumerate(Ts):
        draw.text((left + j * (size + gap) + size // 2 - 14, 6), f"T = {T}", fill=0)
    for i, name in enumerate(names):
        y = top + i * (size + foot + gap)
        draw.text((4, y + size // 2 - 6), name, fill=0)
        for j, T in enumerate(Ts):
            if cells[(name, T)] is not None:
                img.paste(cells[(name, T)].convert("RGB"), (left + j * (size + gap), y))
                draw.text((left + j * (size + gap), y + size + 1), caption(name, T), fill=(90, 90, 90))
    if note:
        draw.text((4, img.size[1] - 12), note, fill=(220, 0, 0))
    img.save(path, optimize=True)
