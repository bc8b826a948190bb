"""
machinery/pretrained.py -- start from published DDPM weights in diffusers' format (UNet2DModel).

load(source) returns (UNetConfig, state_dict, description); the state dict has exactly the
keys of UNet(config) (unet.py), whose outputs then equal diffusers' UNet2DModel's. source is
a Hugging Face model id (e.g. "google/ddpm-cifar10-32", downloaded once into torch's hub
cache), a folder holding config.json + diffusion_pytorch_model.bin, or one such .bin file
(config.json beside it, else google/ddpm-cifar10-32's config is assumed).

    import unet
    from machinery import pretrained
    config, state, desc = pretrained.load("google/ddpm-cifar10-32")
    model = unet.UNet(config); model.load_state_dict(state)

Dropout: diffusers' configs hold inference settings (newer ones write dropout 0.0, the
hub's google/ddpm-* configs have no dropout key); a config's value is kept, and without one
unet_config uses DDPM's training value 0.1. Change it with dataclasses.replace(config, dropout=...).
Needs only torch: the hub's repositories also serve the .bin (a pickled state dict), which
torch.load(weights_only=True) reads; a .safetensors file is refused (use the .bin, or convert it).
"""

import dataclasses
import json
import os
import re

import torch

from unet import UNet, UNetConfig

HUB_URL = "https://huggingface.co/{model_id}/resolve/main/{filename}"
CONFIG_FILE = "config.json"
WEIGHT_FILE = "diffusion_pytorch_model.bin"
DEFAULT_MODEL = "google/ddpm-cifar10-32"
DDPM_CIFAR10_CONFIG = {   # google/ddpm-cifar10-32's config.json
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
# settings we support, with diffusers' UNet2DModel defaults for absent keys: (key, default, allowed)
_REQUIRED = [("time_embedding_type", "positional", ["positional"]), ("time_embedding_dim", None, [None]),
             ("flip_sin_to_cos", True, [False]), ("freq_shift", 0, [1]), ("center_input_sample", False, [False]),
             ("mid_block_type", "UNetMidBlock2D", ["UNetMidBlock2D"]), ("add_attention", True, [True]),
             ("mid_block_scale_factor", 1, [1]), ("downsample_padding", 1, [0]), ("downsample_type", "conv", ["conv"]),
             ("upsample_type", "conv", ["conv"]), ("act_fn", "silu", ["silu"]), ("norm_num_groups", 32, [32]),
             ("norm_eps", 1e-5, [1e-6]), ("attn_norm_num_groups", None, [None, 32]),
             ("resnet_time_scale_shift", "default", ["default"]), ("class_embed_type", None, [None]),
             ("num_class_embeds", None, [None])]


def is_hub_id(source):
    """True for "owner/name" strings that are not an existing local path (nor look like a file)."""
    return (isinstance(source, str) and not os.path.exists(source)
            and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) is not None
            and not source.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".json")))


def download(model_id):
    """config.json and diffusion_pytorch_model.bin of model_id, fetched once into a folder of
    torch's hub cache, <torch.hub.get_dir()>/checkpoints/<owner>--<name>; returns the folder."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints", model_id.replace("/", "--"))
    files = [(HUB_URL.format(model_id=model_id, filename=f), os.path.join(folder, f))
             for f in (CONFIG_FILE, WEIGHT_FILE)]
    try:
        os.makedirs(folder, exist_ok=True)
        for url, path in files:
            if not os.path.exists(path):
                torch.hub.download_url_to_file(url, path)
    except Exception as e:
        why = " ".join(str(e).split())[:200]
        fetch = "; ".join(f"{u} -> {p}" for u, p in files if not os.path.exists(p))
        raise RuntimeError(f"could not download {model_id} ({type(e).__name__}: {why}); fetch by hand: {fetch}; "
                           f"or pass the path of a {WEIGHT_FILE} (its {CONFIG_FILE} beside it)") from None
    return folder


def read_weights(path):
    """A diffusers state dict from a .bin file (torch.load, weights only)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:   # torch's own message would suggest weights_only=False: wrong here, and unsafe
        raise RuntimeError(f"{path} is not a readable PyTorch state dict ({os.path.getsize(path):,} bytes: a truncated "
                           f"or corrupt download?): delete it and download it again") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} holds no diffusers state dict (a dict of tensors)")
    return sd


def unet_config(diffusers_config):
    """UNetConfig of a diffusers UNet2DModel config (dict) that unet.UNet reproduces exactly;
    ValueError naming the first unsupported setting. Absent keys take UNet2DModel's defaults."""
    c = diffusers_config
    for key, default, allowed in [("_class_name", "UNet2DModel", ["UNet2DModel"])] + _REQUIRED:
        if c.get(key, default) not in allowed:
            raise ValueError(f"unsupported diffusers config: {key}={c.get(key, default)!r} (supported: {allowed})")
    size = c.get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    chans, down, up = (list(c.get(k) or []) for k in ("block_out_channels", "down_block_types", "up_block_types"))
    attn = [t == "AttnDownBlock2D" for t in down]
    mirror = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]   # up block i mirrors down n-1-i
    head_dim, attn_chans = c.get("attention_head_dim", 8), {ch for ch, a in zip(chans, attn) if a} | set(chans[-1:])
    for ok, what in [
            (isinstance(size, int), f"sample_size={c.get('sample_size')!r} (one int: square images)"),
            (c.get("in_channels", 3) == c.get("out_channels", 3), f"out_channels={c.get('out_channels', 3)} "
                                                                   f"!= in_channels={c.get('in_channels', 3)}"),
            (chans and len(chans) == len(down), f"block_out_channels={chans} with down_block_types={down}"),
            (all(ch % 32 == 0 and ch % chans[0] == 0 for ch in chans),
             f"block_out_channels={chans} (multiples of 32, for 32 GroupNorm groups, and of the first)"),
            (set(down) <= {"DownBlock2D", "AttnDownBlock2D"},
             f"down_block_types={down} (only DownBlock2D, AttnDownBlock2D)"),
            (up == mirror, f"up_block_types={up} (must mirror down_block_types: {mirror})"),
            (head_dim is None or attn_chans == {head_dim},   # + the middle block's attention
             f"attention_head_dim={head_dim} (one head only: None, or the attention's channels {attn_chans})")]:
        if not ok:
            raise ValueError(f"unsupported diffusers config: {what}")
    return UNetConfig(image_size=size, channels=c.get("in_channels", 3), ch=chans[0],
                      ch_mult=tuple(ch // chans[0] for ch in chans), num_res_blocks=c.get("layers_per_block", 2),
                      attn_res=tuple(size >> i for i, a in enumerate(attn) if a),
                      dropout=c.get("dropout", 0.1))


_RESNET = [("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "time_emb_proj"), ("norm2", "norm2"),
           ("conv2", "conv2"), ("skip", "conv_shortcut")]
_ATTN = [("norm", ["group_norm"]), ("qkv", ["to_q", "to_k", "to_v"]), ("proj", ["to_out.0"])]
_OLD_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0.",
              ".Conv2d_0.": ".conv."}   # diffusers' earlier attention names; Downsample2D's alias of conv


def _modules(config):
    """[(our module, [its diffusers modules])]; attention's qkv is to_q, to_k, to_v concatenated."""
    m = [("conv_in", ["conv_in"]), ("temb.0", ["time_embedding.linear_1"]), ("temb.2", ["time_embedding.linear_2"]),
         ("out.0", ["conv_norm_out"]), ("out.2", ["conv_out"])]

    def block(ours, theirs, j, attn=True):   # a ResBlock and its attention, if any
        m.extend((f"{ours}.{a}", [f"{theirs}.resnets.{j}.{b}"]) for a, b in _RESNET)
        m.extend((f"{ours}.attn.{a}", [f"{theirs}.attentions.{j}.{b}" for b in bs]) for a, bs in _ATTN if attn)

    block("mid.0", "mid_block", 0)
    block("mid.1", "mid_block", 1, attn=False)
    n = len(config.ch_mult)
    for side, extra, sampler in (("down", 0, "downsamplers"), ("up", 1, "upsamplers")):
        k = 0   # index in UNet.down / UNet.up: ResBlocks, then the level's Down/Upsample
        for i in range(n):
            for j in range(config.num_res_blocks + extra):
                block(f"{side}.{k}", f"{side}_blocks.{i}", j)
                k += 1
            if i < n - 1:
                m.append((f"{side}.{k}.conv", [f"{side}_blocks.{i}.{sampler}.0.conv"]))
                k += 1
    return m


def convert(state_dict, diffusers_config):
    """diffusers UNet2DModel state dict -> state dict of UNet(unet_config(diffusers_config))."""
    config = unet_config(diffusers_config)
    with torch.device("meta"):   # shapes only, nothing allocated
        expected = UNet(config).state_dict()
    src = {}
    for name, t in state_dict.items():
        for old, new in _OLD_NAMES.items():
            name = name.replace(old, new)
        src.setdefault(name, t)   # a duplicate under an old name is dropped
    out, used = {}, set()
    for ours, theirs in _modules(config):
        for p in ("weight", "bias"):
            names = [f"{t}.{p}" for t in theirs]
            if f"{ours}.{p}" in expected and all(n in src for n in names):
                t = src[names[0]] if len(names) == 1 else torch.cat([src[n] for n in names])
                # attention's Linear weights (C_out, C_in) become 1x1 conv weights (C_out, C_in, 1, 1)
                out[f"{ours}.{p}"] = t[:, :, None, None] if t.dim() == 2 and expected[f"{ours}.{p}"].dim() == 4 else t
                used.update(names)
    bad = {"missing": [k for k in expected if k not in out], "unexpected": [k for k in src if k not in used],
           "shape mismatch": [f"{k} {tuple(out[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                              if k in out and out[k].shape != v.shape]}
    for what, names in bad.items():
        if names:
            raise ValueError(f"diffusers weights don't fit the config: {len(names)} {what}: "
                             f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}")
    return {k: out[k] for k in expected}


def load(source=DEFAULT_MODEL):
    """(UNetConfig, state dict for unet.UNet, description) of a hub id, a folder, or a .bin file."""
    if str(source).endswith(".safetensors"):
        raise ValueError(f"{source}: .safetensors is not read here; use the {WEIGHT_FILE} of the same "
                         f"repository, or convert it (safetensors.torch.load_file, then torch.save)")
    folder = download(source) if is_hub_id(source) else source
    if os.path.isdir(folder):
        weights = os.path.join(folder, WEIGHT_FILE)
        if not os.path.exists(weights):
            raise FileNotFoundError(f"{folder} holds no {WEIGHT_FILE}")
    elif os.path.isfile(source):
        weights = source
    else:
        raise FileNotFoundError(f"{source}: no such file or folder, nor a Hugging Face model id like {DEFAULT_MODEL}")
    config_path = os.path.join(os.path.dirname(weights), CONFIG_FILE)
    desc = f"diffusers UNet2DModel {source}" + (f" ({weights})" if weights != source else "")
    try:
        with open(config_path) as f:
            dcfg = json.load(f)
    except FileNotFoundError:
        dcfg = DDPM_CIFAR10_CONFIG
        desc += f"; no {CONFIG_FILE} beside it: assumed {DEFAULT_MODEL}'s config"
    except ValueError as e:
        raise RuntimeError(f"{config_path} is not readable JSON: {e}") from None
    return unet_config(dcfg), convert(read_weights(weights), dcfg), desc


def load_model(source=DEFAULT_MODEL):
    """(UNet holding the published weights, its UNetConfig, description); the model equals
    diffusers' UNet2DModel with those weights."""
    cfg, state, desc = load(source)
    model = UNet(cfg)
    model.load_state_dict(state)
    return model, cfg, desc


RUN_CHOOSES = ("smd", "latent_dim", "dropout")   # what a run starting from published weights still chooses
CHAIN = {"T": 1000, "schedule": "linear", "objective": "eps"}   # the chain they were trained on


def initial_model(source, run, channels, image_size):
    """train.py --init: (UNet holding published DDPM weights, the run's UNetConfig, description).
    The weights fix the network's shape and the chain (T=1000, linear betas, eps); the run (a
    dict of train.py's flags) chooses smd, latent_dim and dropout: SMD's g_xi and f_phi start
    fresh, with f_phi's last layer at zero, so the SMD model starts exactly at DDPM's weights."""
    if any(run[k] != v for k, v in CHAIN.items()):
        raise ValueError(f"--init {source}: the weights fix the chain ({CHAIN}): drop --T, --schedule and --objective")
    model, cfg, desc = load_model(source)
    if (cfg.channels, cfg.image_size) != (channels, image_size):
        raise ValueError(f"--init {source} takes {cfg.channels}x{cfg.image_size}x{cfg.image_size} images, "
                         f"--dataset {run['dataset']} has {channels}x{image_size}x{image_size}")
    return model, dataclasses.replace(cfg, **{k: run[k] for k in RUN_CHOOSES}), desc
