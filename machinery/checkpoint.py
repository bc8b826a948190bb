"""
machinery/checkpoint.py -- a model on disk: what train.py writes (machinery/run.py keeps the run's
folder), what sample.py and machinery/bench.py load.

A checkpoint (out_dir/ckpt.pt) is one dict:
  model, ema        state dicts of the uncompiled network (raw and EMA weights)
  model_class       the network's class as "module.Class" (unet.UNet, or another of this repository's)
  diffusion_class   the chain's class, likewise (smd.Diffusion)
  model_config      the network's config dataclass as a dict: its shape, fixed for the life of a run
  config            train.py's other settings: dataset, T, schedule, lr, ... (--resume keeps the
                    dataset and the chain, and lets the rest be overridden)
  optimizer, step, rng (one state per rank)
load_checkpoint imports the classes a checkpoint names, which must be defined in this
repository's own files (`resolve`), so loading needs no list of models. It also takes published
DDPM weights in diffusers' format (pretrained.py): a Hugging Face id such as
google/ddpm-cifar10-32, a folder, or a .bin file; and a run folder, meaning its ckpt.pt.

    python -c "from machinery import checkpoint; m, d, info = checkpoint.load_checkpoint('out/ckpt.pt'); print(info)"
"""

import dataclasses
import importlib
import os
import pickle
import zipfile

import torch

import smd
from machinery import pretrained
from machinery.data import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository


def class_path(cls):
    """"module.Class", as a checkpoint names its model and chain."""
    return f"{cls.__module__}.{cls.__qualname__}"


def own_modules(root=ROOT):
    """The repository's own modules, listed from its files (nothing imported): the top-level
    .py files and the .py files of its top-level packages (folders with an __init__.py, such as
    machinery/). A virtual environment inside the clone is no package: none of it is listed."""
    names = set()
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if entry.endswith(".py") and entry[:-3].isidentifier():
            names.add(entry[:-3])
        elif entry.isidentifier() and os.path.isfile(os.path.join(path, "__init__.py")):
            names.update(f"{entry}.{f[:-3]}" for f in os.listdir(path) if f.endswith(".py") and f[:-3].isidentifier())
    return names


def resolve(path, base=torch.nn.Module, what="model"):
    """The class a checkpoint names ("module.Class"), a subclass of `base`: its module must be one of
    this repository's own files (own_modules), decided from the name before anything is imported."""
    module, _, name = path.rpartition(".")
    cls = None
    if module in own_modules():
        cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"it names the class {path!r}, which is not a {what} of this repository")
    return cls


def build_model(model_class, model_config):
    """The network a checkpoint describes: its class (a path or the class) built from its config dict."""
    cls = resolve(model_class) if isinstance(model_class, str) else model_class
    if not hasattr(cls, "config_class"):
        raise ValueError(f"it names the class {model_class!r}, which has no config_class: not a model of this "
                         f"repository")
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
        return model.to(device).eval(), smd.Diffusion(1000).to(device), info
    key = "ema" if ema else "model"
    ckpt = read_checkpoint(path, need=("config", key))
    names = ckpt.get("model_class", "unet.UNet"), ckpt.get("diffusion_class", "smd.Diffusion")
    try:
        model = build_model(names[0], ckpt["model_config"])
        run = ckpt["config"]
        diffusion = resolve(names[1], smd.Diffusion, "diffusion chain")(run["T"], run["schedule"], run["objective"])
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: {e}") from None
    try:
        model.load_state_dict(ckpt[key])
    except RuntimeError as e:
        raise ValueError(f"{path}: the '{key}' weights do not fit the network its config describes "
                         f"(a checkpoint of another model?): {' '.join(str(e).split()[6:])[:200]}...") from None
    info = {**ckpt["config"], **ckpt["model_config"], "step": ckpt.get("step"), "model_class": names[0]}
    return model.to(device).eval(), diffusion.to(device), info
