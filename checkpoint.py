"""
checkpoint.py -- a model on disk and on the machine: what train.py writes, what sample.py and
bench.py build and load, and the CUDA settings all three run under.

A checkpoint (out_dir/ckpt.pt) is one dict:
  model, ema      state dicts of the uncompiled UNet (raw and EMA weights)
  model_config    unet.UNetConfig as a dict: the network's shape, fixed for the life of a run
  config          train.py's other settings: dataset, T, schedule, lr, ... (--resume keeps
                  dataset, T and schedule, and lets the rest be overridden)
  optimizer, step, rng
Checkpoints written before `model_config` existed hold the network's fields in `config`,
and were built with GroupNorm eps 1e-5 and symmetric downsampling padding; they load as such.
load_checkpoint also takes published DDPM weights in diffusers' format (pretrained.py): a
Hugging Face id such as google/ddpm-cifar10-32, a folder, or a .bin/.safetensors file.

    python -c "import checkpoint; m, d, info = checkpoint.load_checkpoint('out/ckpt.pt'); print(info)"
"""

import dataclasses
import os

import torch

import pretrained
import smd
from data import atomic_write
from unet import UNet, UNetConfig

MODEL_FIELDS = [f.name for f in dataclasses.fields(UNetConfig)]
# checkpoints without model_config: the network's fields they hold, and how they were built
OLD_FIELDS = ("image_size", "channels", "ch", "ch_mult", "num_res_blocks", "attn_res", "dropout", "smd", "latent_dim")
LEGACY = {"norm_eps": 1e-5, "tf_downsample": False}


def model_config(ckpt):
    """The UNetConfig a checkpoint was trained with (either format)."""
    if "model_config" in ckpt:
        return UNetConfig(**ckpt["model_config"])
    config = ckpt["config"]
    missing = [k for k in OLD_FIELDS if k not in config]
    if missing:
        raise ValueError(f"its config lacks {missing}: a checkpoint of another model?")
    return UNetConfig(**LEGACY, **{k: config[k] for k in OLD_FIELDS})


def build_diffusion(config):
    """The diffusion chain a train.py config describes (T steps, noise schedule, objective)."""
    return smd.Diffusion(config["T"], config.get("schedule", "linear"), config.get("objective", "eps"))


def save_checkpoint(ckpt, path):
    """torch.save, atomically: a crash mid-write leaves the previous file intact."""
    atomic_write(path, lambda f: torch.save(ckpt, f))


def read_checkpoint(path, need=("config",)):
    """The checkpoint dict at `path`, with errors that say what is wrong: missing, unreadable,
    or not written by train.py (lacking the entries in `need`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path} (train one with train.py, or pass --ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                           f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or any(k not in ckpt for k in need):
        found = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a train.py checkpoint: it needs {['config', *need[1:]]} entries, has {found}")
    return ckpt


def is_diffusers(path):
    """A Hugging Face model id, a folder, or a diffusers weights file (not a train.py checkpoint)."""
    return pretrained.is_hub_id(path) or os.path.isdir(path) or path.endswith((".bin", ".safetensors"))


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
    on DDPM's chain (T=1000, linear betas)."""
    if is_diffusers(path):
        model, cfg, desc = load_pretrained(path)
        info = {"dataset": None, "T": 1000, "schedule": "linear", "objective": "eps", "init": desc,
                **dataclasses.asdict(cfg), "step": None}
        return model.to(device).eval(), build_diffusion(info).to(device), info
    key = "ema" if ema else "model"
    ckpt = read_checkpoint(path, need=("config", key))
    try:
        cfg = model_config(ckpt)
        model, diffusion = UNet(cfg), build_diffusion(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    try:
        model.load_state_dict(ckpt[key])
    except RuntimeError as e:
        raise ValueError(f"{path}: the '{key}' weights do not fit the U-Net its config describes "
                         f"(a checkpoint of another model?): {' '.join(str(e).split()[6:])[:200]}...") from None
    info = {**ckpt["config"], **dataclasses.asdict(cfg), "step": ckpt.get("step")}
    return model.to(device).eval(), diffusion.to(device), info

# -----------------------------------------------------------------------------
# the machine


def cuda_defaults(device, compile=None, amp=None):
    """(compile, amp): both default to on with CUDA, where TF32 matmuls/convs and cuDNN's
    autotuner are switched on too."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return (cuda if compile is None else compile), (cuda if amp is None else amp)


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"
