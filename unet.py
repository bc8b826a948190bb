"""
unet.py -- the DDPM U-Net (Ho et al. 2020), optionally with Soft Mixture Denoising.

UNet() with no arguments is DDPM's CIFAR-10 network (ch=128, ch_mult (1,2,2,2), 2
ResBlocks per level, attention at 16x16 and in the middle, dropout 0.1): 35.7M parameters.
UNet(smd=True) adds a smd.SoftMixture: the pooled encoder bottleneck feeds g_xi, and
f_phi's (scale, shift) modulate the GroupNorm before the second conv of every middle and
decoder ResBlock (Eq. 11: theta_hat = theta u f_phi(z_t, t)).

    python unet.py              # prints the parameter counts of the CIFAR-10 models
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from smd import SoftMixture, modulate, timestep_embedding

DEFAULT_CH_MULT = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}


def norm(ch):
    return nn.GroupNorm(math.gcd(32, ch), ch)   # 32 groups, fewer when ch is no multiple of 32


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding, GroupNorm (modulated by SMD) -SiLU-dropout-conv,
    residual; optionally followed by single-head self-attention."""

    def __init__(self, c_in, c_out, temb_dim, dropout, attn=False):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.norm2, self.dropout = norm(c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = Attention(c_out) if attn else None
        nn.init.zeros_(self.conv2.weight)   # DDPM: init_scale=0 on the last conv of a block

    def forward(self, x, temb, mod=None):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = modulate(self.norm2(h), mod)    # h = norm(h) * (1 + scale) + shift
        h = self.skip(x) + self.conv2(self.dropout(F.silu(h)))
        return h if self.attn is None else self.attn(h)


class Attention(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, temb=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, image_size=32, channels=3, ch=128, ch_mult=None, num_res_blocks=2,
                 attn_res=(16,), dropout=0.1, smd=False, latent_dim=64):
        super().__init__()
        if image_size not in DEFAULT_CH_MULT and ch_mult is None:
            raise ValueError(f"image_size={image_size}: give ch_mult, or use one of {sorted(DEFAULT_CH_MULT)}")
        ch_mult = tuple(ch_mult or DEFAULT_CH_MULT[image_size])
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_size={image_size} is not divisible by 2^{len(ch_mult) - 1} (ch_mult={ch_mult})")
        self.image_size, self.channels, self.ch = image_size, channels, ch
        self.latent_dim = latent_dim if smd else 0
        temb_dim = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(channels, ch, 3, padding=1)

        # encoder: remember each output's channels for the skip connections
        self.down, skips, c, res = nn.ModuleList(), [ch], ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, ch * mult, temb_dim, dropout, attn=res in attn_res))
                c = ch * mult
                skips.append(c)
            if level != len(ch_mult) - 1:
                self.down.append(Downsample(c))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, temb_dim, dropout, attn=True),
                                  ResBlock(c, c, temb_dim, dropout)])
        # decoder: num_res_blocks + 1 ResBlocks per level, each eating one skip
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), ch * mult, temb_dim, dropout, attn=res in attn_res))
                c = ch * mult
            if level != 0:
                self.up.append(Upsample(c))
                res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)

        # SMD: the middle and decoder ResBlocks are modulated by f_phi
        self.mixture = None
        if smd:
            modulated = [m.conv2.out_channels for m in [*self.mid, *self.up] if isinstance(m, ResBlock)]
            self.mixture = SoftMixture(latent_dim, feat_dim=self.mid[0].conv1.in_channels,
                                       temb_dim=temb_dim, block_channels=modulated, hidden=temb_dim)

    def modulations(self, h, temb, eta):
        """Alg. 1 lines 6-7: z_t = g_xi(eta, x_t, t) from the pooled bottleneck, then
        f_phi(z_t, t). Yields one (scale, shift) per modulated block (None if vanilla)."""
        if self.mixture is None:
            return iter(lambda: None, 0)   # endless Nones
        if eta is None:
            eta = torch.randn(h.shape[0], self.latent_dim, device=h.device)
        return iter(self.mixture(eta, h.float().mean((2, 3)).to(temb.dtype), temb))

    def forward(self, x, t, eta=None):
        if x.shape[1:] != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"input of shape {tuple(x.shape)}, this UNet takes "
                             f"(B, {self.channels}, {self.image_size}, {self.image_size})")
        temb = self.temb(timestep_embedding(t, self.ch))
        hs = [self.conv_in(x)]
        for layer in self.down:
            hs.append(layer(hs[-1], temb))
        h = hs[-1]
        mods = self.modulations(h, temb, eta)
        for block in self.mid:
            h = block(h, temb, next(mods))
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                h = layer(torch.cat([h, hs.pop()], dim=1), temb, next(mods))
        return self.out(h)


if __name__ == "__main__":
    for smd in (False, True):
        n = sum(p.numel() for p in UNet(smd=smd).parameters())
        print(f"UNet(smd={smd}): {n:,} parameters")
