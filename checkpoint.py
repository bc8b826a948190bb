"""
checkpoint.py -- a model on disk: what train.py writes, what sample.py and bench.py build and
load; and a training run's folder (one run at a time: lock_run) and random state.

A checkpoint (out_dir/ckpt.pt) is one dict:
  model, ema      state dicts of the uncompiled UNet (raw and EMA weights)
  model_config    unet.UNetConfig as a dict: the network's shape, fixed for the life of a run
  config          train.py's other settings: dataset, T, schedule, lr, ... (--resume keeps
                  dataset, T and schedule, and lets the rest be overridden)
  optimizer, step, rng
A categorical model (categorical.py, train.py --categorical K) stores `components` in its
model_config and is rebuilt as such. load_checkpoint also takes published DDPM weights in
diffusers' format (pretrained.py): a Hugging Face id such as google/ddpm-cifar10-32, a folder,
or a .bin file; and a run folder, meaning its ckpt.pt.

    python -c "import checkpoint; m, d, info = checkpoint.load_checkpoint('out/ckpt.pt'); print(info)"
"""

import dataclasses
import fcntl
import os
import pickle
import zipfile

import torch
import torch.distributed as dist

import pretrained
import smd
from categorical import CategoricalConfig, CategoricalDiffusion, CategoricalUNet
from data import atomic_write
from unet import UNet, UNetConfig

MODEL_FIELDS = [f.name for f in dataclasses.fields(CategoricalConfig)]   # UNetConfig's and the categorical's


def model_config(fields):
    """UNetConfig, or CategoricalConfig when the fields have components > 0, from a dict."""
    if fields.get("components"):
        return CategoricalConfig(**fields)
    return UNetConfig(**{k: v for k, v in fields.items() if k not in ("components", "learned_var")})


def build_model(cfg):
    return CategoricalUNet(cfg) if isinstance(cfg, CategoricalConfig) else UNet(cfg)


def build_diffusion(config, categorical=False):
    """The diffusion chain a train.py config describes (T steps, noise schedule, objective)."""
    return (CategoricalDiffusion if categorical else smd.Diffusion)(config["T"], config["schedule"],
                                                                      config["objective"])


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
        raise RuntimeError(f"{path} is corrupt or truncated ({os.path.getsize(path):,} bytes; not a torch "
                           f"checkpoint): delete it, or restore it from a copy") from None
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


def load_pretrained(source):
    """(UNet, its config, description) of published DDPM weights (pretrained.py); the model
    equals diffusers' UNet2DModel with those weights."""
    cfg, state, desc = pretrained.load(source)
    model = UNet(cfg)
    model.load_state_dict(state)
    return model, cfg, desc


def load_checkpoint(path, device="cpu", ema=True):
    """(model in eval mode, diffusion, info) from a train.py checkpoint, info being its config
    with the model's fields and 'step'; or from published DDPM weights in diffusers' format,
    on DDPM's chain (T=1000, linear betas). A run folder means its ckpt.pt."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "ckpt.pt")):
        path = os.path.join(path, "ckpt.pt")
    if is_diffusers(path):
        model, cfg, desc = load_pretrained(path)
        info = {"dataset": None, "T": 1000, "schedule": "linear", "objective": "eps", "init": desc,
                **dataclasses.asdict(cfg), "step": None}
        return model.to(device).eval(), build_diffusion(info).to(device), info
    key = "ema" if ema else "model"
    ckpt = read_checkpoint(path, need=("config", key))
    try:
        cfg = model_config(ckpt["model_config"])
        model = build_model(cfg)
        diffusion = build_diffusion(ckpt["config"], isinstance(cfg, CategoricalConfig))
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: {e}") from None
    try:
        model.load_state_dict(ckpt[key])
    except RuntimeError as e:
        raise ValueError(f"{path}: the '{key}' weights do not fit the U-Net its config describes "
                         f"(a checkpoint of another model?): {' '.join(str(e).split()[6:])[:200]}...") from None
    info = {**ckpt["config"], **dataclasses.asdict(cfg), "step": ckpt.get("step")}
    return model.to(device).eval(), diffusion.to(device), info

# -----------------------------------------------------------------------------
# a training run's folder and random state


def lock_run(out_dir):
    """Hold an exclusive lock on out_dir/.lock for the life of the process (the OS releases it
    if the process dies); a second run in the same folder is refused."""
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise OSError(f"another training run is using --out-dir {out_dir}") from None
    return f


def rng_states(device, world, gather):
    """This process's RNG states; under DDP a list over ranks (gathered unless `gather` is off)."""
    state = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
    if world == 1 or not gather:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def restore_rng(states, rank, world, seed, step):
    """Continue this rank's random streams where the checkpoint left them (or reseed, saying so)."""
    if len(states) != world:   # e.g. a Ctrl-C checkpoint of a DDP run, or a different world size
        print(f"rank {rank}: the checkpoint has RNG states of {len(states)} ranks, not {world}: reseeding")
        return torch.manual_seed(seed + rank + 1_000_003 * step)
    torch.set_rng_state(states[rank]["torch"])
    if states[rank]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[rank]["cuda"])
