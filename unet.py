"""
unet.py -- the DDPM U-Net (Ho et al. 2020), optionally modulated by Soft Mixture Denoising.

UNet(UNetConfig()) is DDPM's CIFAR-10 network (ch=128, ch_mult (1,2,2,2), 2 ResBlocks per
level, attention at 16x16 and in the middle, dropout 0.1): 35,746,307 parameters.
UNetConfig(smd=True) adds an smd.SoftMixture: the pooled encoder bottleneck feeds g_xi, and
f_phi's (scale, shift) modulate the GroupNorm before the second conv of every middle and
decoder ResBlock (Eq. 11: theta_hat = theta u f_phi(z_t, t)). Where to look: UNet.forward (the soft
mixture is called once per pass) and ResBlock.forward (modulate).

    python unet.py              # parameter counts of the CIFAR-10 models, and the matched control
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from smd import SoftMixture, modulate, timestep_embedding

DEFAULT_CH_MULT = {8: (1, 2), 16: (1, 2, 2), 32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4),
                   256: (1, 1, 2, 2, 4, 4)}


@dataclass
class UNetConfig:
    """Everything that fixes the network's shape; a checkpoint stores it (checkpoint.py)."""
    image_size: int = 32
    channels: int = 3
    ch: int = 128
    ch_mult: tuple = None        # None: DEFAULT_CH_MULT[image_size]
    num_res_blocks: int = 2
    attn_res: tuple = (16,)      # resolutions with self-attention
    dropout: float = 0.1
    smd: bool = False            # Soft Mixture Denoising: g_xi and f_phi (smd.SoftMixture)
    latent_dim: int = 64         # SMD: dimension of eta and z_t
    norm_groups: int = 32        # GroupNorm: gcd(norm_groups, channels) groups in each layer (DDPM: 32)

    def __post_init__(self):
        if self.ch_mult is None:
            if self.image_size not in DEFAULT_CH_MULT:
                raise ValueError(f"image_size={self.image_size}: give ch_mult, or use one of {sorted(DEFAULT_CH_MULT)}")
            self.ch_mult = DEFAULT_CH_MULT[self.image_size]
        self.ch_mult, self.attn_res = tuple(self.ch_mult), tuple(self.attn_res)
        if self.norm_groups < 1:
            raise ValueError(f"norm_groups={self.norm_groups}: GroupNorm needs at least one group")
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"image_size={self.image_size} is not divisible by 2^{len(self.ch_mult) - 1} "
                             f"(ch_mult={self.ch_mult})")


def norm(ch, groups=32):
    """GroupNorm with DDPM's (TensorFlow's) epsilon and gcd(groups, ch) groups: DDPM's 32, fewer
    when ch is no multiple of 32 (UNetConfig.norm_groups). At small widths the count swings with
    ch: 32 channels make 32 groups of one (each channel normalised on its own), 30 make 2 of 15."""
    return nn.GroupNorm(math.gcd(groups, ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding, GroupNorm (modulated by SMD) -SiLU-dropout-conv,
    residual; optionally followed by single-head self-attention."""

    def __init__(self, c_in, c_out, temb_dim, dropout, attn=False, groups=32):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.norm2, self.dropout = norm(c_out, groups), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = Attention(c_out, groups) if attn else None
        nn.init.zeros_(self.conv2.weight)   # DDPM: init_scale=0 on the last conv of a block

    def forward(self, x, temb, mod=None):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = modulate(self.norm2(h), mod)    # h = norm(h) * (1 + scale) + shift
        h = self.skip(x) + self.conv2(self.dropout(F.silu(h)))
        return h if self.attn is None else self.attn(h)


class Attention(nn.Module):
    def __init__(self, ch, groups=32):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(ch, groups), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3x3 conv. DDPM (TF, padding 'SAME') pads one row/column at the bottom/right only."""
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x, temb=None):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    config_class = UNetConfig   # what checkpoint.py builds a saved network from

    def __init__(self, config=None):
        super().__init__()
        self.config = c = config or UNetConfig()
        self.image_size, self.channels = c.image_size, c.channels
        self.latent_dim = c.latent_dim if c.smd else 0   # smd.Diffusion draws eta of this size
        temb_dim = 4 * c.ch
        self.temb = nn.Sequential(nn.Linear(c.ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(c.channels, c.ch, 3, padding=1)

        # encoder: remember each output's channels for the skip connections
        block = lambda c_in, c_out, attn=False: ResBlock(c_in, c_out, temb_dim, c.dropout, attn, c.norm_groups)
        self.down, skips, ch, res = nn.ModuleList(), [c.ch], c.ch, c.image_size
        for level, mult in enumerate(c.ch_mult):
            for _ in range(c.num_res_blocks):
                self.down.append(block(ch, c.ch * mult, attn=res in c.attn_res))
                ch = c.ch * mult
                skips.append(ch)
            if level != len(c.ch_mult) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([block(ch, ch, attn=True), block(ch, ch)])
        # decoder: num_res_blocks + 1 ResBlocks per level, each eating one skip
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.ch_mult))):
            for _ in range(c.num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), c.ch * mult, attn=res in c.attn_res))
                ch = c.ch * mult
            if level != 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.out = self.output_layer(ch)

        # SMD: f_phi modulates the middle and decoder ResBlocks; `modulated` indexes them in mid + up
        layers = [*self.mid, *self.up]
        self.modulated = [i for i, m in enumerate(layers) if isinstance(m, ResBlock)]
        self.soft_mixture = None
        if c.smd:
            self.soft_mixture = SoftMixture(c.latent_dim, feat_dim=self.mid[0].conv1.in_channels, temb_dim=temb_dim,
                                            block_channels=[layers[i].conv2.out_channels for i in self.modulated],
                                            hidden=temb_dim)

    def output_layer(self, ch):
        """GroupNorm-SiLU-conv to the image's channels; DDPM starts the last conv at zero."""
        out = nn.Sequential(norm(ch, self.config.norm_groups), nn.SiLU(), nn.Conv2d(ch, self.channels, 3, padding=1))
        nn.init.zeros_(out[-1].weight)
        return out

    def forward(self, x, t, eta=None):
        """eps_hat(x_t, t, eta). For SMD, Alg. 1 lines 6-7 (Alg. 2 lines 5-6) run here, once per pass:
        g_xi sees eta, the pooled bottleneck and the time embedding; f_phi's (scale, shift) go to
        the middle and decoder blocks."""
        hs, temb = self.encode(x, t)
        mods = {}                                           # layer index in mid + up -> (scale, shift)
        if self.soft_mixture is not None:
            if eta is None:
                raise ValueError("an SMD U-Net needs eta ~ N(0, I) of shape (B, latent_dim): "
                                 "smd.Diffusion draws it (Alg. 1 line 5, Alg. 2 line 4)")
            pooled = hs[-1].float().mean((2, 3)).to(temb.dtype)                     # the pooled x_t features
            mods = dict(zip(self.modulated, self.soft_mixture(eta, pooled, temb)))   # z_t, then f_phi(z_t, t)
        return self.out(self.decode(hs, temb, mods))

    def encode(self, x, t):
        """(the encoder's outputs, which the decoder takes as skips, the last being the bottleneck;
        the time embedding)."""
        if x.shape[1:] != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"input of shape {tuple(x.shape)}, this UNet takes "
                             f"(B, {self.channels}, {self.image_size}, {self.image_size})")
        temb = self.temb(timestep_embedding(t, self.config.ch))
        hs = [self.conv_in(x)]
        for layer in self.down:
            hs.append(layer(hs[-1], temb))
        return hs, temb

    def decode(self, hs, temb, mods=None):
        """The middle and decoder blocks on the encoder's outputs hs (each decoder block eats one
        skip); mods: {layer index in mid + up: (scale, shift)}, SMD's modulation. The last features."""
        h, hs, mods = hs[-1], list(hs), mods or {}
        for i, layer in enumerate([*self.mid, *self.up]):
            if isinstance(layer, Upsample):
                h = layer(h)
            else:                                           # decoder blocks eat one skip each
                h = layer(h if i < len(self.mid) else torch.cat([h, hs.pop()], 1), temb, mods.get(i))
        return h


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def matched_width(target, make, step=8):
    """The width w (a multiple of `step`) whose model make(w) has the parameter count closest to
    `target`: the same-size control for an SMD model (or any larger one)."""
    w = step
    while n_params(make(w + step)) <= target:
        w += step
    return min((w, w + step), key=lambda v: abs(n_params(make(v)) - target))


if __name__ == "__main__":
    import argparse
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    vanilla, smd = n_params(UNet()), n_params(UNet(UNetConfig(smd=True)))
    print(f"UNet (DDPM, CIFAR-10): {vanilla:,} parameters")
    print(f"UNet + SMD (latent 64): {smd:,} parameters (+{100 * (smd / vanilla - 1):.1f}%)")
    ch = matched_width(smd, lambda w: UNet(UNetConfig(ch=w)))
    control = n_params(UNet(UNetConfig(ch=ch)))
    print(f"the parameter-matched vanilla control: --ch {ch}, {control:,} parameters "
          f"({100 * (control / smd - 1):+.1f}% vs SMD)")
