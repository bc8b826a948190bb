"""
fashion_classifier.py -- a small Fashion-MNIST classifier and the scores fashion.py builds on it:
are generated samples clean garments or blends, and of how many classes?

Trained in a minute or two on the 60k training images at 16x16 (88.0-88.4% test accuracy at
fashion.py's 2,000 steps, seeds 0-2). fashion.py reports its test accuracy, FD-clf (the Frechet
distance in its 128 penultimate features) and the class_metrics of every model's samples:

    clf = train_classifier(x_train, y_train, iters=2000, seed=0)
    probs, feats = classify(clf, samples)      # uint8 (N, 1, 16, 16)
    class_metrics(probs)                       # {'confident': ..., 'coverage': ..., 'tv': ...}
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIDENT, SHARE = 0.9, 0.25


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
