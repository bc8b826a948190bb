"""
cli.py -- what the scripts share on the command line: argument checks that fail in one line
before any work starts, the CPU thread count, the CUDA defaults and a time format for ETAs.

Every script builds its parser with `Parser`, so a bad flag is one line on stderr,
`script.py: what is wrong, and the fix`, with exit status 2 and no traceback, and `--help`
shows every default. Checks that need more than one flag call `fail` with the same format.

    python -c "import cli; print(cli.fmt_time(4000))"
"""

import argparse
import os
import sys

import torch


class Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and one-line errors (`prog: message`, exit 2)."""

    def __init__(self, description=None, **kw):
        super().__init__(description=description, formatter_class=HelpFormatter, **kw)

    def error(self, message):
        fail(self.prog, message.replace("argument ", "", 1))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown for every option; the description (a script's docstring) kept as written."""


def fail(prog, message):
    """The one way a script refuses its input: one line on stderr, exit status 2."""
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)

# -----------------------------------------------------------------------------
# argparse types: each names the range it wants


def _number(kind, low, high=None, low_open=False, what=""):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if v != v or (v <= low if low_open else v < low) or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return v
    return parse


positive_int = _number(int, 0, low_open=True, what="give an integer >= 1")
nonneg_int = _number(int, 0, what="give an integer >= 0")
positive_float = _number(float, 0.0, low_open=True, what="give a number > 0")
nonneg_float = _number(float, 0.0, what="give a number >= 0")
probability = _number(float, 0.0, 1.0, what="give a number in [0, 1]")
temperature = _number(float, 1.0, what="give a starting temperature >= 1 (1: no annealing)")


def dropout(text):
    v = _number(float, 0.0, what="give a dropout rate in [0, 1)")(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"{text} is out of range: give a dropout rate in [0, 1)")
    return v


def decay(text):
    v = _number(float, 0.0, 1.0, what="give an EMA decay in [0, 1)")(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"{text} is out of range: give an EMA decay in [0, 1), e.g. 0.9999")
    return v


def int_list(text, low=1):
    """'1,2,2' or '1 2 2' -> [1, 2, 2]; '' -> [] (every value >= low)."""
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if any(v < low for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= {low}")
    return values


def positive_ints(text):
    """A non-empty comma-separated list of integers >= 1."""
    values = int_list(text)
    if not values:
        raise argparse.ArgumentTypeError("give at least one integer")
    return values


def choices_list(options):
    """A comma-separated list, each item one of `options`."""
    def parse(text):
        items = [v for v in text.split(",") if v]
        bad = [v for v in items if v not in options]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: use a comma-separated list of {', '.join(options)}")
        return items
    return parse

def device(text):
    """A torch device this machine has (cpu, cuda, cuda:1, ...), kept as the string given."""
    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N")
    if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA "
                                         f"device(s); use cpu or another cuda:N")
    return text

# -----------------------------------------------------------------------------
# output paths: checked before the work, not after it


def writable_file(prog, path, flag):
    """Refuse an output file whose folder is missing or not writable, or that is a folder."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        fail(prog, f"{flag} {path} is a folder: give a file name")
    if not os.path.isdir(folder):
        fail(prog, f"{flag} {path}: the folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK):
        fail(prog, f"{flag} {path}: the folder {folder} is not writable; choose another path")


def writable_dir(prog, path, flag):
    """Refuse an output folder that cannot be created or written."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(prog, f"{flag} {path} is a file, not a folder; choose another {flag}")
    parent = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    while parent and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent or ".", os.W_OK):
        fail(prog, f"{flag} {path}: {parent} is not writable; choose another {flag}")

# -----------------------------------------------------------------------------
# the machine


def set_threads(n):
    """torch's intra-op threads on CPU. n = 0: torch's default, except on machines with <= 4
    cores, where one thread was 7x faster than the default in a measured tiny training run
    (2 vCPUs: 300 vs 2,100 ms/step). Returns the count in use."""
    if n == 0 and (os.cpu_count() or 1) <= 4:
        n = 1
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def cuda_defaults(device, compile=None, amp=None):
    """(compile, amp): both default to on with CUDA, where TF32 matmuls/convs and cuDNN's
    autotuner are switched on too."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return (cuda if compile is None else compile), (cuda if amp is None else amp)


def fmt_time(s):
    """Seconds as 1h02m or 3m05s (progress lines' ETAs)."""
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def int_at_least(low, why):
    """An argparse type: an integer >= low; `why` says what the bound is for."""
    return _number(int, low, what=f"give an integer >= {low} ({why})")


def add_categorical_flags(p):
    """The categorical model's training options (categorical.py), as templates.py and fashion.py take them."""
    p.add_argument("--anneal", type=temperature, default=1e6,
                   help="categorical: responsibilities' temperature from this to 1 over the first half (1: off)")
    p.add_argument("--nll-cap", type=positive_float, default=None,
                   help="categorical: cap each step's NLL weight on |x0_hat - x0|^2 (categorical.capped_weight)")
    p.add_argument("--mean-loss", type=nonneg_float, default=0.0,
                   help="categorical: + this x Algorithm 1's eps loss on the mixture's mean (sum_k pi_k x0_k)")
    p.add_argument("--fixed-var", action="store_true",
                   help="categorical: variances fixed at beta_tilde instead of learned")
    p.add_argument("--fit-pi", action="store_true",
                   help="categorical: pi also weighs each component by N(eps_hat_k; 0, I), its own fit to x_t")
    p.add_argument("--draw-snr", type=nonneg_float, default=None,
                   help="categorical sampling: draw a component only where x_t's SNR abar/(1-abar) <= this, "
                        "else the mixture's mean (default: at every step)")
    p.add_argument("--split", action="store_true",
                   help="categorical: after annealing, blends are copied into the least used components (split_blends)")
