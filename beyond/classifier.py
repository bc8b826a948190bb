"""
beyond/classifier.py -- a small Fashion-MNIST classifier and the scores built on it: are generated
samples clean garments or blends, and of how many classes?

Trained in a minute or two on the 60k training images at 16x16 (88.0-88.4% test accuracy at
2,000 steps, seeds 0-2). beyond/fashion.py reports its test accuracy, FD-clf (the Frechet
distance in its 128 penultimate features) and the class_metrics of every model's samples:

    clf = train_classifier(x_train, y_train, iters=2000, seed=0)
    probs, feats = classify(clf, samples)      # uint8 (N, 1, 16, 16)
    class_metrics(probs)                       # {'confident': ..., 'coverage': ..., 'tv': ...}

As a script it scores sample files (sample.py --npz: uint8 NHWC under 'images', 1 channel, 16x16,
or 32x32 average-pooled to 16x16 as load_split pools): it trains the classifier on the 60k
training images (under a minute on one core) and prints one line per file: N, the confident
share, coverage, TV and the confident samples' class counts, and the classifier's test accuracy.
The README's quick start is scored so:

    python -m beyond.classifier out/quick/samples.npz
"""

import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery import data

CONFIDENT, SHARE = 0.9, 0.25


# -----------------------------------------------------------------------------
# the data: uint8 (N, 1, size, size) and labels


def load_labels(data_dir, split):
    """The labels of data.load_images('fashion-mnist', ...), from the same folders in the same order."""
    dirs = [os.path.join(data_dir, "FashionMNIST", "raw"), *data.SYSTEM_DIRS["fashion-mnist"]]
    prefix = "train" if split == "train" else "t10k"
    files = [os.path.join(d, f"{prefix}-labels-idx1-ubyte{gz}") for d in dirs for gz in ("", ".gz")]
    found = [f for f in files if os.path.exists(f)]
    if not found:
        raise OSError(f"no Fashion-MNIST {split} labels in {' or '.join(dirs)}")
    return torch.from_numpy(data.read_idx(found[0]).astype(np.int64))


def load_split(data_dir, split, size):
    """(images uint8 (N, 1, size, size), labels (N,)): the 32x32 padded images, average-pooled to
    size (data.load_images, as train.py --image-size reads them)."""
    x = torch.from_numpy(data.load_images("fashion-mnist", data_dir, split, size))
    y = load_labels(data_dir, split)
    if len(y) != len(x):
        raise OSError(f"Fashion-MNIST {split}: {len(x)} images but {len(y)} labels")
    return x, y


def to_model(x):
    """uint8 -> float in [-1, 1], as the classifier and fashion.py's denoisers see images."""
    return x.float() / 127.5 - 1

# -----------------------------------------------------------------------------
# the classifier and its scores: clean garments or blends?


class Classifier(nn.Module):
    """Three 3x3 convs (16, 32, 64 channels, a 2x2 max-pool after the first two), a 128-unit
    layer, 10 logits: ~1.5 MFLOP an image at 16x16."""

    def __init__(self):
        super().__init__()
        conv = lambda c_in, c_out: [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*conv(1, 16), nn.MaxPool2d(2), *conv(16, 32), nn.MaxPool2d(2), *conv(32, 64),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(1024, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(x, y, iters, seed, batch_size=128, lr=2e-3):
    """Adam with cosine decay on uint8 images x (as floats in [-1, 1]), labels y."""
    torch.manual_seed(seed)
    clf, g = Classifier(), torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(clf.parameters(), lr)
    for it in range(iters):
        opt.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * it / iters))
        i = torch.randint(len(x), (batch_size,), generator=g)
        loss = F.cross_entropy(clf(to_model(x[i])), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval()


@torch.no_grad()
def classify(clf, x, batch=1000):
    """(softmax probabilities (N, 10), penultimate features (N, 128) float64) of uint8 images."""
    feats = torch.cat([clf.body(to_model(x[i:i + batch])) for i in range(0, len(x), batch)])
    return clf.head(feats).softmax(1), feats.double().numpy()


def class_metrics(probs, threshold=CONFIDENT, share=SHARE):
    """confident: share of samples with max probability >= threshold; coverage: classes holding
    >= `share` of their expected 1/10 of the confident samples; tv: total variation of the
    confident samples' class histogram from uniform (1 if none is confident)."""
    p, k = probs.max(1)
    sure = p >= threshold
    counts = torch.bincount(k[sure], minlength=10).double()
    n = counts.sum()
    if n == 0:
        return dict(confident=0.0, coverage=0, tv=1.0)
    return dict(confident=sure.double().mean().item(), coverage=int((counts >= share * n / 10).sum()),
                tv=0.5 * (counts / n - 0.1).abs().sum().item())


# -----------------------------------------------------------------------------
# the command line: score sample files


def load_samples(path, size=16):
    """uint8 (N, 1, size, size) from a sample .npz (uint8 NHWC under 'images'); images whose side
    is a multiple of `size` are average-pooled and rounded to it (as load_split)."""
    with np.load(path) as f:
        if "images" not in f:
            raise ValueError(f"{path}: no array 'images' (sample.py --npz writes one)")
        x = f["images"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 1 or x.shape[1] != x.shape[2] or x.shape[1] % size:
        raise ValueError(f"{path}: images {x.dtype} {x.shape}; the classifier takes uint8 (N, H, H, 1), "
                         f"H = {size} or a multiple of it (average-pooled)")
    x = torch.from_numpy(x).permute(0, 3, 1, 2)
    return x if x.shape[-1] == size else F.avg_pool2d(x.float(), x.shape[-1] // size).round().to(torch.uint8)


def main(argv=None):
    from machinery import cli
    p = cli.Parser(__doc__, prog="python -m beyond.classifier")
    p.add_argument("npz", nargs="+", help="sample files: uint8 NHWC under 'images' (sample.py --npz)")
    p.add_argument("--steps", type=cli.positive_int, default=2000, help="classifier training steps (batch 128)")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="the classifier's weights and batches")
    p.add_argument("--data-dir", default="data", help="Fashion-MNIST under data-dir/FashionMNIST/raw, or Debian's")
    cli.add_machine_flags(p, gpu=False)
    args = p.parse_args(argv)
    cli.set_threads(args.threads)
    try:
        samples = {path: load_samples(path) for path in args.npz}   # every file checked before training
        (x_train, y_train), (x_test, y_test) = (load_split(args.data_dir, split, 16) for split in ("train", "test"))
    except (OSError, RuntimeError, ValueError) as e:
        cli.fail(p.prog, str(e))
    t0 = time.time()
    clf = train_classifier(x_train, y_train, args.steps, args.seed)
    acc = (classify(clf, x_test)[0].argmax(1) == y_test).double().mean().item()
    print(f"classifier: {args.steps} steps, seed {args.seed}, test accuracy {acc:.4f}, {time.time() - t0:.0f}s",
          flush=True)
    results = {}
    for path, x in samples.items():
        probs = classify(clf, x)[0]
        conf, k = probs.max(1)
        results[path] = dict(n=len(x), counts=torch.bincount(k[conf >= CONFIDENT], minlength=10).tolist(),
                             test_accuracy=acc, **class_metrics(probs))
        r = results[path]
        print(f"{path}: N {r['n']} | confident {r['confident']:.3f} | coverage {r['coverage']} | tv {r['tv']:.3f} | "
              f"confident per class {r['counts']}", flush=True)
    return results


if __name__ == "__main__":
    main()
