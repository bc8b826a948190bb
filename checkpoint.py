"""
checkpoint.py -- a model on disk and a training run's folder: what train.py writes and resumes,
what sample.py and bench.py load.

A checkpoint (out_dir/ckpt.pt) is one dict:
  model, ema        state dicts of the uncompiled network (raw and EMA weights)
  model_class       the network's class as "module.Class" (unet.UNet, or a model beyond the paper)
  diffusion_class   the chain's class, likewise (smd.Diffusion)
  model_config      the network's config dataclass as a dict: its shape, fixed for the life of a run
  config            train.py's other settings: dataset, T, schedule, lr, ... (--resume keeps the
                    dataset and the chain, and lets the rest be overridden)
  optimizer, step, rng (one state per rank)
load_checkpoint imports the classes a checkpoint names (from this repository only), so loading
needs no list of models. It also takes published DDPM weights in diffusers' format
(pretrained.py): a Hugging Face id such as google/ddpm-cifar10-32, a folder, or a .bin file;
and a run folder, meaning its ckpt.pt.

A run folder holds one run at a time (lock_run), its log.txt (log) and its checkpoint:
resume_run reconciles a --resume with the checkpoint, save_run writes it (the RNG states of
every rank, atomically, with a clear message on a full disk), StopRequest turns Ctrl-C/SIGTERM
into a checkpoint after the step every rank agrees on. Resuming assumes every rank (every node)
sees the same --out-dir: a shared file system.

    python -c "import checkpoint; m, d, info = checkpoint.load_checkpoint('out/ckpt.pt'); print(info)"
"""

import argparse
import dataclasses
import fcntl
import importlib
import importlib.util
import json
import math
import os
import pickle
import signal
import sys
import time
import zipfile

import torch
import torch.distributed as dist

import cli
import pretrained
from data import atomic_write

ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# a model on disk


def class_path(cls):
    """"module.Class", as a checkpoint names its model and chain."""
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve(path):
    """The class a checkpoint names ("module.Class"), imported from this repository only: a
    checkpoint names code, but not code from elsewhere."""
    module, _, name = path.rpartition(".")
    try:
        spec = importlib.util.find_spec(module) if module else None
    except (ImportError, ValueError):
        spec = None
    origin = os.path.abspath(spec.origin) if spec and spec.has_location else ""   # frozen modules have none
    cls = getattr(importlib.import_module(module), name, None) if origin.startswith(ROOT + os.sep) else None
    if not isinstance(cls, type):
        raise ValueError(f"it names the class {path!r}, which is not a model of this repository")
    return cls


def build_model(model_class, model_config):
    """The network a checkpoint describes: its class (a path or the class) built from its config dict."""
    cls = resolve(model_class) if isinstance(model_class, str) else model_class
    return cls(cls.config_class(**model_config))


def save_checkpoint(ckpt, path):
    """torch.save, atomically: a crash mid-write leaves the previous file intact."""
    atomic_write(path, lambda f: torch.save(ckpt, f))


def read_checkpoint(path, need=("config",)):
    """The checkpoint dict at `path`, with errors that say what is wrong: missing, unreadable,
    or not written by train.py (lacking the entries in `need`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError):
        # torch's own message would suggest weights_only=False: wrong here, and unsafe
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"   # torch.save writes a zip: a damaged one still starts so
        raise RuntimeError(f"{path} is not a readable torch checkpoint ({os.path.getsize(path):,} bytes"
                           + ("; a torch zip, truncated or corrupt): delete it, or restore it from a copy"
                              if zipped else "; not a torch zip at all): pass the ckpt.pt train.py wrote")) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "model_config" not in ckpt \
            or any(k not in ckpt for k in need):
        found = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a train.py checkpoint: it needs config, model_config"
                         f"{''.join(', ' + k for k in need[1:])} entries, has {found}")
    return ckpt


def is_diffusers(path):
    """A Hugging Face model id, a folder of diffusers files, or a diffusers weights file."""
    return pretrained.is_hub_id(path) or path.endswith((".bin", ".safetensors")) or \
        (os.path.isdir(path) and not os.path.exists(os.path.join(path, "ckpt.pt")))


def load_checkpoint(path, device="cpu", ema=True):
    """(model in eval mode, diffusion, info) from a train.py checkpoint, info being its config
    with the model's fields, 'step' and 'model_class'; or from published DDPM weights in
    diffusers' format, on DDPM's chain (T=1000, linear betas). A run folder means its ckpt.pt."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "ckpt.pt")):
        path = os.path.join(path, "ckpt.pt")
    if is_diffusers(path):
        model, cfg, desc = pretrained.load_model(path)
        info = {"dataset": None, "T": 1000, "schedule": "linear", "objective": "eps", "init": desc,
                **dataclasses.asdict(cfg), "step": None, "model_class": class_path(type(model))}
        return model.to(device).eval(), resolve("smd.Diffusion")(1000).to(device), info
    key = "ema" if ema else "model"
    ckpt = read_checkpoint(path, need=("config", key))
    names = ckpt.get("model_class", "unet.UNet"), ckpt.get("diffusion_class", "smd.Diffusion")
    try:
        model = build_model(names[0], ckpt["model_config"])
        run = ckpt["config"]
        diffusion = resolve(names[1])(run["T"], run["schedule"], run["objective"])
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: {e}") from None
    try:
        model.load_state_dict(ckpt[key])
    except RuntimeError as e:
        raise ValueError(f"{path}: the '{key}' weights do not fit the network its config describes "
                         f"(a checkpoint of another model?): {' '.join(str(e).split()[6:])[:200]}...") from None
    info = {**ckpt["config"], **ckpt["model_config"], "step": ckpt.get("step"), "model_class": names[0]}
    return model.to(device).eval(), diffusion.to(device), info

# -----------------------------------------------------------------------------
# a training run's folder: the lock, the log, resuming, saving, stopping


def open_run(prog, args, explicit, parser, model_class):
    """(checkpoint or None, the flags restored from it): --out-dir must be writable; with
    --resume its ckpt.pt is read and reconciled with the flags (resume_run), without it a
    ckpt.pt there is refused. Refusals are one line (cli.fail)."""
    cli.output_dir(prog, args.out_dir, "--out-dir")
    path = os.path.join(args.out_dir, "ckpt.pt")
    if not args.resume:
        if os.path.exists(path):
            cli.fail(prog, f"{path} exists: pass --resume to continue it, or choose another --out-dir")
        return None, []
    try:
        return resume_run(path, args, explicit, parser, model_class)
    except (OSError, RuntimeError, ValueError) as e:
        cli.fail(prog, f"--resume: {e}" + ("; start a new run without --resume" if "no checkpoint" in str(e) else ""))


def lock_run(prog, out_dir):
    """Hold an exclusive lock on out_dir/.lock for the life of the process (the OS releases it
    if the process dies); a second run in the same folder is refused in one line."""
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        cli.fail(prog, f"another training run is using --out-dir {out_dir}: wait for it to finish, stop it, "
                       f"or choose another --out-dir")
    return f


def log(msg, out_dir):
    """Print msg and append it to out_dir/log.txt."""
    print(msg, flush=True)
    with open(os.path.join(out_dir, "log.txt"), "a") as f:
        f.write(msg + "\n")


def log_start(out_dir, command, step, config, summary):
    """log.txt records each start: the time, the command line, where it starts, the config and
    a one-line summary of the model and the machine."""
    log(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {command}", out_dir)
    log(f"{'resumed at' if step else 'new run from'} step {step}; config {json.dumps(config, default=list)}", out_dir)
    log(summary, out_dir)


RUN_FIXED = ("dataset", "T", "schedule", "objective")   # with the network's fields: what --resume may not change
MACHINE = ("resume", "out_dir", "device", "compile", "amp", "threads")   # never taken from a checkpoint


def resume_run(path, args, explicit, parser, model_class):
    """The checkpoint of --resume, and the flags restored from it (set on args). The run keeps
    its network, data and chain and takes its other settings unless flags say otherwise; a flag
    that would change the network, the data or the chain is refused (ValueError), and so is a
    restored value that the flag's own check would refuse."""
    ckpt = read_checkpoint(path, need=("config", "model_config", "model", "ema", "optimizer", "step", "rng"))
    stored_class = ckpt.get("model_class", "unet.UNet")
    if stored_class != class_path(model_class):
        raise ValueError(f"{path} holds a {stored_class}, this script trains a {class_path(model_class)}: resume it "
                         f"with the command that started it (the first line of log.txt)")
    run, flag = ckpt["config"], lambda k: cli.flag(parser, k)
    fixed = {**{k: run[k] for k in RUN_FIXED}, **{k: v for k, v in ckpt["model_config"].items() if k != "channels"}}
    as_list = lambda v: list(v) if isinstance(v, tuple) else v
    bad = [f"{flag(k)} {explicit[k]!r} (checkpoint: {as_list(v)!r})" for k, v in fixed.items()
           if k in explicit and as_list(explicit[k]) != as_list(v)]
    if bad:
        raise ValueError(f"this run contradicts {path}: {'; '.join(bad)}. Drop these flags to continue that run, "
                         f"or start a new one in another --out-dir")
    types, stored = {a.dest: a.type for a in parser._actions}, []
    for k, v in {**run, **ckpt["model_config"]}.items():
        if k in explicit or k in MACHINE or not hasattr(args, k):
            continue
        setattr(args, k, v)
        stored.append(k)
        check = types.get(k)
        if callable(check) and check not in (int, float) and v is not None and not isinstance(v, (list, tuple)):
            try:   # a stored value passes the same check as a typed one
                check(str(v))
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"{flag(k)} {v!r} (stored in the checkpoint: pass {flag(k)} to override it): {e}")
    if ckpt["step"] >= args.max_steps:
        raise ValueError(f"{path} is already at step {ckpt['step']} of --max-steps {args.max_steps}: pass a larger "
                         f"--max-steps to train on")
    return ckpt, stored


def rng_states(device, world):
    """This process's RNG states; under DDP a list over every rank (a collective call)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    state = {"torch": torch.get_rng_state(), "cuda": cuda}
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def restore_run(ckpt, model, ema, optimizer, rank, world, seed):
    """Weights, EMA, optimiser and this rank's RNG streams as the checkpoint left them."""
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    restore_rng(ckpt["rng"], rank, world, seed, ckpt["step"])


def restore_rng(states, rank, world, seed, step):
    """Continue this rank's random streams where the checkpoint left them (or reseed, saying so)."""
    if len(states) != world:   # a different number of ranks
        print(f"rank {rank}: the checkpoint has RNG states of {len(states)} ranks, not {world}: reseeding")
        return torch.manual_seed(seed + rank + 1_000_003 * step)
    torch.set_rng_state(states[rank]["torch"])
    if states[rank]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[rank]["cuda"])


def save_run(path, model, ema, optimizer, step, meta, world, master, saved):
    """The run's checkpoint at `step` (called by every rank): refuse non-finite weights, copy the
    model's buffers into the EMA (which averages parameters only), gather every rank's RNG state
    and, on rank 0, write atomically. A failed write (disk full, read-only) keeps the previous
    checkpoint (of step `saved`) and stops the run. Returns step."""
    params = [*model.parameters(), *ema.parameters()]
    if not torch.stack([torch.isfinite(p).all() for p in params]).all().item():
        raise SystemExit(f"non-finite parameters at step {step}; stopping without saving")
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
    rng = rng_states(next(model.parameters()).device, world)
    if master:
        ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "rng": rng, **meta}
        try:
            save_checkpoint(ckpt, path)
        except OSError as e:
            need = 4 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20   # model, EMA, Adam x2
            kept = f"the checkpoint of step {saved} is intact" if saved else "no checkpoint was written before"
            log(f"could not write {path} at step {step} ({e.strerror or e}); {kept}. A checkpoint needs about "
                f"{need:.0f} MiB: free space, then --resume", os.path.dirname(path))
            raise SystemExit(1)
        log(f"saved {path} at step {step}", os.path.dirname(path))
    return step


def mean_loss(loss_sum, first_bad, n, world, saved, ckpt_path):
    """train.py's one host sync: the mean loss over the last n steps and all ranks (loss_sum: their
    sum, first_bad: the first step with a non-finite loss, or inf). On a NaN/inf loss the run
    stops without saving, naming that step and the last good checkpoint (of step `saved`)."""
    s, b = loss_sum.clone(), first_bad.clone()
    if world > 1:
        dist.all_reduce(s)
        dist.all_reduce(b, op=dist.ReduceOp.MIN)
    s, b = torch.stack([s, b]).tolist()
    if math.isfinite(b):
        last = f"the last good checkpoint is {ckpt_path} (step {saved})" if saved else "no checkpoint was written"
        raise SystemExit(f"non-finite loss at step {int(b)}; stopping without saving: {last}.")
    return s / max(n, 1) / world


class StopRequest:
    """Ctrl-C or SIGTERM during training: the first asks the run to stop after its current step
    and save a checkpoint; a second Ctrl-C aborts. Calling the object says whether to stop now.
    Under DDP every rank calls it once per step and they agree (a max all-reduce of the flag on
    a CPU gloo group: no GPU sync), so all stop after the same step, whichever got the signal,
    and the checkpoint holds every rank's RNG state: the resume is exact."""

    def __init__(self, world):
        self.requested = 0   # the signal this process got (its handler sets it at any moment)
        self.signum = None   # the signal that stops the run, once the ranks agree on it
        self.group = dist.new_group(backend="gloo") if world > 1 else None
        self.old = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signum
        print("stopping after this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __call__(self):
        flag = torch.tensor([self.requested])
        if self.group is not None:   # a signal arriving during the all-reduce counts at the next call, on every rank
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.signum = int(flag) or None
        return self.signum is not None

    @property
    def signal_name(self):
        """The name of the signal that stopped the run (None if none did)."""
        return signal.Signals(self.signum).name if self.signum else None

    def close(self):
        for s, h in self.old.items():
            signal.signal(s, h)
