"""
machinery/cli.py -- what the scripts share on the command line: argument checks that fail in one line
before any work starts, output paths checked by writing to them, the CPU thread count, the CUDA
defaults, Ctrl-C in one line, and a time format for ETAs.

Every script builds its parser with `Parser`, so a bad flag is one line on stderr,
`script.py: what is wrong, and the fix`, with exit status 2 and no traceback, and `--help`
shows every option's default. Checks that need more than one flag call `fail` with the same
format. No script replaces an existing output file unless given --force (`output_file`).

    python -c "from machinery import cli; print(cli.fmt_time(4000))"
"""

import argparse
import contextlib
import os
import shlex
import sys
import tempfile
import time

import torch
import torch.distributed as dist


class Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and one-line errors (`prog: message`, exit 2)."""

    def __init__(self, description=None, **kw):
        super().__init__(description=description, formatter_class=HelpFormatter, allow_abbrev=False, **kw)

    def add_argument(self, *names, **kw):
        if names[0].startswith("-") and not kw.get("help"):
            kw["help"] = "default: %(default)s"   # argparse shows nothing for an option without help
        return super().add_argument(*names, **kw)

    def error(self, message):
        fail(self.prog, message.replace("argument ", "", 1))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (unless the help already says it); the description (a
    script's docstring) kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


def flag(parser, dest):
    """The command-line flag of an argument (`--ch-mult` for dest `ch_mult`)."""
    return next(a.option_strings[0] for a in parser._actions if a.dest == dest)


def explicit_args(parser, argv):
    """Only the options given on the command line, as a dict (--resume checks them against the
    checkpoint); argparse has no public way to ask "was this flag given?"."""
    defaults = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in defaults:
            a.default = argparse.SUPPRESS
        return vars(parser.parse_args(argv))
    finally:
        for a, default in defaults:
            a.default = default


def command_line(prog, argv):
    """The shell line that runs `prog` (a script, or "python -m module") with argv, quoted so that
    it re-runs as written (empty values, spaces)."""
    words = prog.split() if prog.startswith("python ") else ["python", prog]
    return shlex.join([*words, *argv])


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
# output paths: checked before the work, by writing beside them, not after it


def _try_writing(folder):
    """None if a file can be created in `folder` (a temporary one, removed at once), else why not.
    os.access would not do: root passes it everywhere, /proc included."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return e.strerror or str(e)


def output_file(prog, path, flag, force=False, exts=None):
    """Refuse, before any work, an output file that could not be written: a wrong extension
    (`exts`, e.g. (".png", ".jpg"): the format comes from it), a folder, a missing or unwritable
    folder, or an existing file (unless `force`: no script replaces a file silently)."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        fail(prog, f"{flag} {path} is a folder: give a file name")
    if exts and not path.lower().endswith(exts):
        fail(prog, f"{flag} {path}: the format comes from the extension; end the name in {' or '.join(exts)}")
    if not os.path.isdir(folder):
        fail(prog, f"{flag} {path}: the folder {folder} does not exist; create it or choose another path")
    if os.path.exists(path) and not force:
        fail(prog, f"{flag} {path} exists: pass --force to replace it, or choose another name")
    why = _try_writing(folder)
    if why:
        fail(prog, f"{flag} {path}: cannot write in {folder} ({why}); choose another path")


def output_dir(prog, path, flag):
    """Refuse an output folder that is a file or cannot be created or written (tried)."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(prog, f"{flag} {path} is a file, not a folder; choose another {flag}")
    parent = os.path.abspath(path)
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    why = _try_writing(parent)
    if why:
        fail(prog, f"{flag} {path}: cannot write in {parent} ({why}); choose another {flag}")


@contextlib.contextmanager
def one_line_interrupt(prog):
    """Ctrl-C inside the block: one line on stderr and exit status 130, no traceback. Outputs are
    written atomically (data.atomic_write), so none is left half-written."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted (Ctrl-C); nothing was written after the last 'wrote' line", file=sys.stderr,
              flush=True)
        raise SystemExit(130) from None

# -----------------------------------------------------------------------------
# the machine


def add_machine_flags(p, gpu=True):
    """--threads, and with gpu --device, --compile and --amp: the same flags in every script."""
    p.add_argument("--threads", type=nonneg_int, default=0,
                   help="CPU threads (0: one per core that other processes leave idle, at least 1)")
    if gpu:
        p.add_argument("--device", type=device, help="cpu, cuda, cuda:N (default: cuda if available)")
        p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on with CUDA)")
        p.add_argument("--amp", action=argparse.BooleanOptionalAction,
                       help="bf16 autocast of the network (default: on with CUDA)")


def busy_cores(seconds=0.25):
    """How many cores other processes keep busy now: the non-idle share of /proc/stat's CPU time
    over `seconds`, times the cores (Linux; elsewhere the 1-minute load average)."""
    def idle_total():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)   # idle + iowait, all
    try:
        (i0, t0), _, (i1, t1) = idle_total(), time.sleep(seconds), idle_total()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def set_threads(n):
    """torch's intra-op threads on CPU; n = 0: one per core that other processes leave idle, at most
    torch's default, at least 1 (under torchrun, whose ranks start together and would count each
    other as busy: the cores shared among this machine's ranks, unmeasured). Measured on a
    2-vCPU machine (docs/performance.md): idle, two threads beat one (the quick start's training
    step 62 against 109 ms, the tests' tiny U-Net 76 against 127 ms); with another process busy
    on one core, two threads lose (225 against 114 ms, 380 against 145 ms). Returns the count."""
    if n == 0:
        n = torch.get_num_threads()   # one per core, or OMP_NUM_THREADS
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if ranks > 1:
            n = max(1, n // ranks)
        elif n > 1:
            n = max(1, min(n, (os.cpu_count() or 1) - round(busy_cores())))
    torch.set_num_threads(n)
    return n


def setup_distributed(device_arg=None):
    """(rank, local_rank, world, device); torchrun's env vars start DDP (NCCL on GPUs, else gloo)."""
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device(device_arg or ("cuda" if cuda else "cpu"))
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return rank, local_rank, world, device


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



def float_at_least(low, why):
    """An argparse type: a number >= low; `why` says what the bound is for."""
    return _number(float, low, what=f"give a number >= {low} ({why})")
