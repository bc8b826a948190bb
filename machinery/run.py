"""
machinery/run.py -- a training run: everything train.py needs around Algorithm 1's loop.
Run(parser, argv, model_class) checks every flag, with what --resume restores, before anything
is loaded (one line, exit 2), sets up DDP under torchrun and locks the run folder; then

  load_data     the batches from the run's step on, the network's config (or --init's weights)
  restore       the checkpoint's weights, optimiser and RNG streams, or --init's weights
  wrap          DDP and torch.compile around the model
  begin         log.txt's header (the command line, re-runnable as written), what a checkpoint
                holds (the network's and the chain's classes among it), and from then on
                Ctrl-C/SIGTERM stop the run after a step that every rank agrees on (StopRequest)
  losses        the loss summed on the device, one host sync per log line (LossMeter)
  log_progress  a progress line: loss, learning rate, ms/step, img/s, ETA
  save_due, save  the checkpoint, atomically, with every rank's RNG state: first at the run's first
                log step (a folder that cannot take it shows at once), then every --ckpt-every
                steps and at the end. A failed write (disk full, read-only folder) is logged and
                tried again at the next save: training goes on
  finish        a stopped run's checkpoint, the retries of one that could not be written, and the
                exit status: 0 once --max-steps is reached, 130 after Ctrl-C, 143 after SIGTERM

A run folder holds one run at a time, its log.txt and ckpt.pt (machinery/checkpoint.py). Resuming
on several nodes assumes every rank sees the same --out-dir: a shared file system.
"""

import argparse
import dataclasses
import datetime
import fcntl
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from machinery import cli, pretrained
from machinery.checkpoint import class_path, read_checkpoint, save_checkpoint
from machinery.data import DATASETS, NAMED_SIZES, make_batches

RUN_FIXED = ("dataset", "T", "schedule", "objective")   # with the network's fields: what --resume may not change
MACHINE = ("resume", "out_dir", "device", "compile", "amp", "threads")   # never taken from a checkpoint
RETRY_S = 60   # seconds between the tries of a checkpoint that could not be written, at the end of a run


class Run:
    """One training run; see the module's docstring. Attributes: args, rank, world, master,
    device, compile, amp, ckpt (the checkpoint resumed, or None), start (its step, or 0)."""

    def __init__(self, parser, argv, model_class):
        args, explicit = parser.parse_args(argv), cli.explicit_args(parser, argv)
        self.rank, self.local_rank, self.world, self.device = cli.setup_distributed(args.device)
        self.master, self.prog, self.args, self.model_class = self.rank == 0, parser.prog, args, model_class
        self.lock = lock_run(self.prog, args.out_dir) if self.master and os.path.isdir(args.out_dir) else None
        try:
            self.ckpt, stored, changed = open_run(self.prog, args, explicit, parser, model_class)
            check_args(args, parser, model_class, explicit, self.world, stored)
        except SystemExit:
            if self.lock:
                self.lock.close()
            raise
        args.flip = args.dataset != "mnist" if args.flip is None else args.flip
        self.lock = self.lock or (lock_run(self.prog, args.out_dir) if self.master else None)   # the folder made now
        self.threads = cli.set_threads(args.threads)
        self.compile, self.amp = cli.cuda_defaults(self.device, args.compile, args.amp)
        self.command = cli.command_line(self.prog, sys.argv[1:] if argv is None else argv)
        self.start = self.ckpt["step"] if self.ckpt else 0
        self.path = os.path.join(args.out_dir, "ckpt.pt")
        self.saved = self.start or None     # the step of the checkpoint on disk (rank 0's knowledge)
        self.attempted = self.saved         # the step of the last save, written or not (every rank)
        self.pending = None                 # rank 0: a checkpoint that could not be written yet
        self.losses, self.history, self.logged = LossMeter(self.world, self.device), [], self.start
        self.stop = self.exit_group = None
        if changed and self.master:
            print(f"--resume: {', '.join(changed)}", flush=True)

    # -- before the loop ---------------------------------------------------------------------

    def load_data(self):
        """(batches from the run's step on, the network's config, --init's (state dict, description)
        or None). The first rank of each node reads (or downloads) the data before the others."""
        args, ckpt = self.args, self.ckpt
        if self.world > 1 and self.local_rank:
            dist.barrier()
        cfg = self.model_class.config_class(**ckpt["model_config"]) if ckpt else None
        try:
            data, channels, size = make_batches(args.dataset, args.data_dir, args.batch_size,
                                                cfg.image_size if cfg else args.image_size, args.flip,
                                                min(4, os.cpu_count() or 1), args.seed, self.start, self.rank,
                                                self.world, self.device, verbose=self.master)
            if cfg and cfg.channels != channels:
                raise ValueError(f"--resume: the data has {channels} channels, the checkpoint's model takes "
                                 f"{cfg.channels}")
            init = None
            if cfg is None and args.init:
                weights, cfg, desc = pretrained.initial_model(args.init, vars(args), channels, size)
                init = (weights.state_dict(), desc)
            elif cfg is None:
                cfg = self.model_class.config_class(**{**network_flags(args, self.model_class), "image_size": size,
                                                       "channels": channels})
        except (OSError, RuntimeError, ValueError) as e:
            cli.fail(self.prog, " ".join(str(e).split()))
        if self.world > 1 and not self.local_rank:
            dist.barrier()
        return data, cfg, init

    def restore(self, model, ema, optimizer, init=None):
        """The checkpoint's weights, EMA, optimiser and this rank's RNG streams; or, in a new run,
        --init's weights (strict=False: SMD's g_xi and f_phi keep their fresh init, f_phi's last
        layer at zero) and then a seed per rank for the noise, t and dropout."""
        if self.ckpt:
            model.load_state_dict(self.ckpt["model"])
            ema.load_state_dict(self.ckpt["ema"])
            optimizer.load_state_dict(self.ckpt["optimizer"])
            return restore_rng(self.ckpt["rng"], self.rank, self.world, self.args.seed, self.start)
        if init:
            for m in (model, ema):
                m.load_state_dict(init[0], strict=False)
            print(f"initialised from {init[1]}", flush=True)
        torch.manual_seed(self.args.seed + self.rank)

    def wrap(self, model):
        """The model as the loop calls it: under DDP, then compiled (compile(DDP(...)): the
        all-reduces overlap the compiled backward)."""
        net = DDP(model, device_ids=[self.local_rank] if self.device.type == "cuda" else None) \
            if self.world > 1 else model
        return torch.compile(net) if self.compile else net

    def begin(self, model, ema, optimizer, diffusion_class):
        """log.txt's header; what a checkpoint holds (it names diffusion_class, the chain that
        samples the model); from now on Ctrl-C/SIGTERM stop the run after a step."""
        self.model, self.ema, self.optimizer = model, ema, optimizer
        network = network_flags(self.args, self.model_class)
        self.meta = {"config": {k: v for k, v in vars(self.args).items() if k not in network},
                     "model_config": dataclasses.asdict(model.config), "model_class": class_path(self.model_class),
                     "diffusion_class": class_path(diffusion_class)}
        if self.master:
            c, a = model.config, self.args
            cpu = f" ({self.threads} thread{'s' * (self.threads > 1)})" if self.device.type == "cpu" else ""
            summary = (f"{self.model_class.__name__}{' with SMD' * getattr(c, 'smd', False)}, "
                       f"{sum(p.numel() for p in model.parameters()):,} parameters, {a.dataset} "
                       f"{c.channels}x{c.image_size}x{c.image_size}, batch {a.batch_size} on {self.world} x "
                       f"{self.device}{cpu}, compile={self.compile}, bf16={self.amp}")
            log_start(a.out_dir, self.command, self.start, {**self.meta["config"], "model_config":
                                                            self.meta["model_config"]}, summary)
        self.stop = StopRequest(self.world)
        if self.world > 1:   # for the last barrier: rank 0 may take long to write its checkpoint
            self.exit_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
        self.t_log = time.time()

    # -- in the loop -------------------------------------------------------------------------

    def mean_loss(self, reset=False):
        """The mean loss since the last log line over every rank (a host sync). A non-finite
        loss stops the run here, without saving, naming its step and the last good checkpoint."""
        loss, bad = self.losses.mean(reset)
        if bad is not None:
            last = f"the last good checkpoint is {self.path} (step {self.saved})" if self.saved else \
                "no checkpoint was written"
            raise SystemExit(f"non-finite loss at step {bad}; stopping without saving: {last}.")
        return loss

    def log_progress(self, step, lr):
        n, loss = self.losses.n, self.mean_loss(reset=True)
        dt, self.t_log = (time.time() - self.t_log) / max(n, 1), time.time()
        self.history.append((step, loss))
        if self.master:
            log(f"step {step}/{self.args.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {1000 * dt:.1f} ms/step | "
                f"{self.args.batch_size / dt:.0f} img/s | ETA {cli.fmt_time(dt * (self.args.max_steps - step))}",
                self.args.out_dir)

    def save_due(self, step):
        """A checkpoint at the run's first log step, every --ckpt-every steps, and at the end."""
        a = self.args
        return step % a.ckpt_every == 0 or step == a.max_steps or step == self.start + a.log_every

    def save(self, step):
        """The checkpoint at `step`, called by every rank: refuse non-finite losses or weights, copy
        the model's buffers into the EMA (which averages parameters only), gather every rank's RNG
        state and, on rank 0, write it atomically (`write`)."""
        self.mean_loss()
        params = [*self.model.parameters(), *self.ema.parameters()]
        if not torch.stack([torch.isfinite(p).all() for p in params]).all().item():
            raise SystemExit(f"non-finite parameters at step {step}; stopping without saving")
        for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
            b_ema.copy_(b)
        rng, self.attempted = rng_states(self.device, self.world), step
        if self.master:   # the state dicts share the live tensors: written now, or superseded by the next save
            self.pending = {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                            "optimizer": self.optimizer.state_dict(), "step": step, "rng": rng, **self.meta}
            self.write(step < self.args.max_steps and not self.stop.signum)

    def write(self, training_goes_on):
        """Rank 0: write the pending checkpoint; True if it was. A failure keeps the previous
        checkpoint and the run, and says so."""
        step, out = self.pending["step"], self.args.out_dir
        try:
            save_checkpoint(self.pending, self.path)
        except OSError as e:
            need = 4 * sum(p.numel() * p.element_size() for p in self.model.parameters()) / 2**20   # model, EMA, Adam
            kept = f"the checkpoint of step {self.saved} is intact" if self.saved else "no checkpoint is on disk yet"
            then = "training goes on and the next save tries again" if training_goes_on else \
                f"trying again every {RETRY_S} s"
            log(f"could not write {self.path} at step {step} ({e.strerror or e}); {kept}; {then}. A checkpoint needs "
                f"about {need:.0f} MiB: free space, or make {out} writable", out)
            return False
        log(f"saved {self.path} at step {step}", out)
        self.saved, self.pending = step, None
        return True

    # -- after the loop ----------------------------------------------------------------------

    def finish(self, step):
        """A stopped run's checkpoint (every rank stopped after the same step); on rank 0 the
        retries of a checkpoint not yet written, every RETRY_S seconds until it is or a Ctrl-C or
        SIGTERM gives up. Returns the exit status: 0 at --max-steps, else 128 + the signal."""
        if self.stop.signum and self.attempted != step:
            self.save(step)
        status = self.stop.signum and 128 + self.stop.signum
        if self.master and self.pending is not None:
            status = self.retry_write() or status
        if self.exit_group is not None:   # no rank leaves before rank 0 has written (torchrun ends the others
            dist.barrier(group=self.exit_group)   # when one exits non-zero)
        if self.master:
            log(f"stopped by {self.stop.signal_name} at step {step}" if self.stop.signum else
                f"finished at step {step}", self.args.out_dir)
        return status or 0

    def retry_write(self):
        """Rank 0: write the pending checkpoint, trying every RETRY_S seconds; None once written,
        128 + the signal if Ctrl-C or SIGTERM gave up (the run's last steps are then lost)."""
        gave_up = []

        def give_up(signum, frame):
            gave_up.append(signum)
            raise KeyboardInterrupt
        old = {s: signal.signal(s, give_up) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:   # the write has just failed
                time.sleep(RETRY_S)
                if self.write(False):
                    return None
        except KeyboardInterrupt:
            after = cli.command_line(self.prog, ["--resume", "--out-dir", self.args.out_dir])
            kept = f"the checkpoint of step {self.saved} is intact: {after} continues it" if self.saved else \
                "nothing was saved: start the run again"
            log(f"gave up writing {self.path}: steps {self.saved or 0}-{self.pending['step']} are lost; {kept}",
                self.args.out_dir)
            return 128 + (gave_up[0] if gave_up else signal.SIGINT)
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def close(self):
        """The signal handlers back, the folder's lock released, DDP ended."""
        if self.stop is not None:
            self.stop.close()
        if self.lock:
            self.lock.close()   # the OS releases it when the process ends; a caller in this process needs it now
        if self.world > 1:
            dist.destroy_process_group()


class LossMeter:
    """The training loss summed on the device since the last log line (no host sync per step),
    with the first step whose loss was not finite. `mean` is the one sync: the mean over those
    steps and every rank, and that step (or None)."""

    def __init__(self, world, device):
        self.world, self.n = world, 0
        self.sum, self.first_bad = torch.zeros((), device=device), torch.full((), math.inf, device=device)

    def add(self, loss, step):
        self.sum, self.n = self.sum + loss, self.n + 1
        self.first_bad = torch.where(loss.isfinite(), self.first_bad, self.first_bad.clamp(max=step))

    def mean(self, reset=False):
        s, b = self.sum.clone(), self.first_bad.clone()
        if self.world > 1:
            dist.all_reduce(s)
            dist.all_reduce(b, op=dist.ReduceOp.MIN)
        s, b = torch.stack([s, b]).tolist()
        mean = s / max(self.n, 1) / self.world
        if reset:
            self.sum, self.n = torch.zeros_like(self.sum), 0
        return mean, int(b) if math.isfinite(b) else None

# -----------------------------------------------------------------------------
# the flags: checked before anything is loaded, and reconciled with a checkpoint on --resume


def network_flags(args, model_class):
    """{field: value} of the flags that fix the network (its config dataclass's fields), not the run."""
    fields = {f.name for f in dataclasses.fields(model_class.config_class)}
    return {k: v for k, v in vars(args).items() if k in fields}


def check_args(args, parser, model_class, explicit=(), world=1, stored=()):
    """Refuse what cannot run, in one line naming the flag. `explicit`: the flags given on the
    command line; `stored`: those whose value came from the checkpoint (their messages say how
    to override them)."""
    def bad(dest, why):
        name = cli.flag(parser, dest)
        where = f" (stored in the checkpoint: pass {name} to override it)" if dest in stored else ""
        cli.fail(parser.prog, f"{name} {getattr(args, dest)!r}{where}: {why}")

    named = args.dataset in DATASETS
    if not named and not os.path.isdir(args.dataset):
        bad("dataset", f"neither {' | '.join(DATASETS)} nor a folder of images")
    if named and args.image_size not in (None, *NAMED_SIZES):
        bad("image_size", f"{args.dataset} is 32x32 (28x28 is padded), or average-pooled to 16 or 8: use one of those")
    if args.batch_size % world:
        bad("batch_size", f"not divisible by {world} ranks")
    if args.sample_every and (args.sample_steps or 0) > args.T:
        bad("sample_steps", f"the chain has only --T {args.T} steps")
    if args.eta_samples > 1 and not args.smd:
        bad("eta_samples", "draws several SMD etas per example: add --smd (or drop it)")
    size = args.image_size or (32 if named else 64)
    try:
        levels = len(model_class.config_class(image_size=size, ch_mult=args.ch_mult).ch_mult)
    except ValueError as e:
        bad("ch_mult" if args.ch_mult else "image_size", str(e))
    if set(args.attn_res) - {size >> i for i in range(levels)}:
        bad("attn_res", f"the U-Net's resolutions are {[size >> i for i in range(levels)]}")
    try:   # the whole network's config
        model_class.config_class(**{**network_flags(args, model_class), "image_size": size})
    except ValueError as e:
        cli.fail(parser.prog, str(e))
    fixed = [k for k in network_flags(args, model_class) if k in explicit and k not in pretrained.RUN_CHOOSES]
    fixed += [k for k, v in pretrained.CHAIN.items() if getattr(args, k) != v]
    if args.init and fixed:
        bad("init", f"the weights fix the network and the chain ({pretrained.CHAIN}): drop "
                    f"{', '.join(cli.flag(parser, k) for k in fixed)}")


def open_run(prog, args, explicit, parser, model_class):
    """(checkpoint or None, the flags restored from it, the flags it changes as 'flag old -> new'):
    --out-dir must be writable; with --resume its ckpt.pt is read and reconciled with the flags
    (resume_run), without it a ckpt.pt there is refused. Refusals are one line (cli.fail)."""
    cli.output_dir(prog, args.out_dir, "--out-dir")
    path = os.path.join(args.out_dir, "ckpt.pt")
    if not args.resume:
        if os.path.exists(path):
            cli.fail(prog, f"{path} exists: pass --resume to continue it, or choose another --out-dir")
        return None, [], []
    try:
        return resume_run(path, args, explicit, parser, model_class)
    except (OSError, RuntimeError, ValueError) as e:
        cli.fail(prog, f"--resume: {e}" + ("; start a new run without --resume" if "no checkpoint" in str(e) else ""))


def resume_run(path, args, explicit, parser, model_class):
    """The checkpoint of --resume, the flags restored from it (set on args) and the changes. The
    run keeps its network, data and chain and takes its other settings unless flags say
    otherwise; a flag that would change the network, the data or the chain is refused
    (ValueError), and so is a restored value that the flag's own check would refuse."""
    ckpt = read_checkpoint(path, need=("config", "model_config", "model", "ema", "optimizer", "step", "rng"))
    stored_class = ckpt.get("model_class", "unet.UNet")
    if stored_class != class_path(model_class):
        raise ValueError(f"{path} holds a {stored_class}, this script trains a {class_path(model_class)}: resume it "
                         f"with the command that started it (the second line of its log.txt) and --resume")
    run, flag = ckpt["config"], lambda k: cli.flag(parser, k)
    fixed = {**{k: run[k] for k in RUN_FIXED}, **{k: v for k, v in ckpt["model_config"].items() if k != "channels"}}
    as_list = lambda v: list(v) if isinstance(v, tuple) else v
    bad = [f"{flag(k)} {explicit[k]!r} (checkpoint: {as_list(v)!r})" for k, v in fixed.items()
           if k in explicit and as_list(explicit[k]) != as_list(v)]
    if bad:
        raise ValueError(f"this run contradicts {path}: {'; '.join(bad)}. Drop these flags to continue that run, "
                         f"or start a new one in another --out-dir")
    changed = [f"{flag(k)} {as_list(run[k])!r} -> {as_list(v)!r}" for k, v in explicit.items()
               if k in run and k not in fixed and k not in MACHINE and as_list(v) != as_list(run[k])]
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
    return ckpt, stored, changed

# -----------------------------------------------------------------------------
# the folder: one run at a time, its log


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
    """Print msg and append it to out_dir/log.txt (a folder that cannot take it costs the line only)."""
    print(msg, flush=True)
    try:
        with open(os.path.join(out_dir, "log.txt"), "a") as f:
            f.write(msg + "\n")
    except OSError:
        pass


def log_start(out_dir, command, step, config, summary):
    """log.txt records each start in four lines: the time and where it starts, the command line
    (re-runnable as written: add --resume to continue the run), the config, and a summary."""
    log(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resumed at' if step else 'new run from'} step {step}", out_dir)
    log(command, out_dir)
    log(f"config {json.dumps(config, default=list)}", out_dir)
    log(summary, out_dir)

# -----------------------------------------------------------------------------
# random streams and stops


def rng_states(device, world):
    """This process's RNG states; under DDP a list over every rank (a collective call)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    state = {"torch": torch.get_rng_state(), "cuda": cuda}
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def restore_rng(states, rank, world, seed, step):
    """Continue this rank's random streams where the checkpoint left them (or reseed, saying so)."""
    if len(states) != world:   # a different number of ranks
        print(f"rank {rank}: the checkpoint has RNG states of {len(states)} ranks, not {world}: reseeding")
        return torch.manual_seed(seed + rank + 1_000_003 * step)
    torch.set_rng_state(states[rank]["torch"])
    if states[rank]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[rank]["cuda"])


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
