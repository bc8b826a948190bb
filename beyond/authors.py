"""
beyond/authors.py -- the SMD authors' g_xi and f_phi (their released code, vanderschaarlab/smd:
nn.py's HyperNet and UNet, main.py's `identifier`) around this repository's U-Net, to ask whether
the unused latent (docs/findings.md) is the paper's or only our soft mixture's.

Ours (smd.SoftMixture): eta (B, latent_dim), g_xi an MLP on [eta, pooled bottleneck, time embedding],
f_phi an MLP to per-channel (scale, shift) of the decoder's GroupNorms, last layer at zero (SMD
starts as the vanilla model). Theirs, as here:
  eta     N(0, I) of the image's shape (smd.Diffusion draws it as (B, C*H*W): latent_dim = C*H*W)
  g_xi    a small U-Net on cat(x_t, eta) with a time input, giving a per-pixel latent z_t
          (their `identifier`); here unet.UNet itself with 2C input and latent_ch output channels
  f_phi   per pixel, `hypernet_layers` matrices W_k(z) = u_k u_k^T + softplus(s_k) I with u_k = A_k z
          (rank 1 + a positive multiple of I), applied in a residual branch
          h + out(W_L ... W_1 in(h)) twice: after the first conv and before the output layer
          (their in_hypernet and out_hypernet); no time input but through z
  init    PyTorch's defaults, s_k ~ N(0, 1), and the output conv too (their final_conv): eta
          changes eps_hat from step 0. (unet.UNet starts its output conv at zero, DDPM's choice,
          which would make eps_hat = 0 for every eta at step 0.)

Scaled from their CIFAR-10 script (cases/run_smd.sh: width 128, --exp_scale 2, --latent_mults
1,2, --latent_dim 100, --hypernet_layers 2) by the main U-Net's width `ch`, nothing else:
  g_xi's width    ch / 4 (theirs 128 / 4 = 32; beyond/fashion.py's ch 32: 8)    `id_ch`
  g_xi's levels   (1, 2), with the main U-Net's ResBlocks per level and no attention but the
                  middle block's (theirs: 2 blocks per level, linear attention)  `id_ch_mult`
  z's channels    round(100 ch / 128) (theirs 100; ch 32: 25)                  `latent_ch`
  f_phi's depth   2 matrices per residual layer, unchanged                      `hypernet_layers`
The main network is unet.UNet unchanged (not their lucidrains U-Net), so that only g_xi and f_phi
differ from the other arms. The (u u^T + s I) r products are computed as u (u.r) + s r, without
the L x L matrix per pixel their code builds (the same numbers).

    model = AuthorsUNet(AuthorsConfig(image_size=16, channels=1, ch=32, ch_mult=(1, 2, 2)))
    eps_hat = model(x_t, t, eta)          # eta: (B, 256), drawn by smd.Diffusion
    python -m beyond.fashion --T 5 --models smd,smd-random,authors --eta-curve 10 --n 512 --no-fid   # the study
    python -m beyond.train --model authors --dataset fashion-mnist --image-size 16 --ch 32 ...
    python -m beyond.authors --report out/authors/*.json --png out/authors/eta.png   # table and figure

docs/authors-smd.md reports the study.
"""

import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from machinery import cli
from smd import timestep_embedding
from unet import UNet, UNetConfig, norm

# -----------------------------------------------------------------------------
# the model


@dataclass
class AuthorsConfig(UNetConfig):
    latent_ch: int = None        # z_t's channels per pixel (None: round(100 ch / 128), their 100 at width 128)
    id_ch: int = None            # g_xi's U-Net width (None: max(4, ch // 4), their --exp_scale 2)
    id_ch_mult: tuple = (1, 2)   # g_xi's levels (their --latent_mults 1,2)
    hypernet_layers: int = 2     # f_phi's matrices per residual layer (their --hypernet_layers 2)

    def __post_init__(self):
        if self.smd:
            raise ValueError("smd=True: the authors' model has its own g_xi and f_phi, not smd.SoftMixture")
        super().__post_init__()
        self.latent_dim = self.channels * self.image_size**2   # eta has the image's shape
        self.latent_ch = self.latent_ch or max(1, round(100 * self.ch / 128))
        self.id_ch = self.id_ch or max(4, self.ch // 4)
        self.id_ch_mult = tuple(self.id_ch_mult)
        if min(self.latent_ch, self.id_ch, self.hypernet_layers) < 1:
            raise ValueError(f"latent_ch={self.latent_ch}, id_ch={self.id_ch}, hypernet_layers={self.hypernet_layers}:"
                             f" each must be at least 1")


def default_init_output(ch, out_channels, groups):
    """GroupNorm-SiLU-conv with the conv at PyTorch's default init (their final_conv), where
    unet.UNet starts it at zero (DDPM's choice)."""
    return nn.Sequential(norm(ch, groups), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))


class Identifier(UNet):
    """g_xi: a U-Net from cat(x_t, eta) (2C channels) and t to z_t (latent_ch channels per pixel),
    its output conv at PyTorch's default init (their identifier's final_conv)."""

    def __init__(self, config, out_channels):
        self.out_channels = out_channels   # read by output_layer, which UNet.__init__ calls
        super().__init__(config)

    def output_layer(self, ch):
        return default_init_output(ch, self.out_channels, self.config.norm_groups)


class HyperNet(nn.Module):
    """f_phi's residual layer, per pixel (their nn.HyperNet): r = in(h), then for k = 1..L
    r <- W_k r with W_k = u_k u_k^T + softplus(s_k) I and u_k = A_k z, then out(r)."""

    def __init__(self, ch, latent_ch, layers):
        super().__init__()
        self.u = nn.ModuleList(nn.Linear(latent_ch, latent_ch) for _ in range(layers))   # A_k
        self.s = nn.Parameter(torch.randn(layers))
        self.inp, self.outp = nn.Linear(ch, latent_ch), nn.Linear(latent_ch, ch)

    def forward(self, h, z):
        """The branch's output (B, ch, H, W) for features h (B, ch, H, W) and latent z (B, latent_ch, H, W)."""
        r, z = self.inp(h.permute(0, 2, 3, 1)), z.permute(0, 2, 3, 1)
        for A, s in zip(self.u, F.softplus(self.s)):
            u = A(z)
            r = u * (u * r).sum(-1, keepdim=True) + s * r      # (u u^T + s I) r
        return self.outp(r).permute(0, 3, 1, 2)


class AuthorsUNet(UNet):
    """unet.UNet with the authors' g_xi (Identifier) and f_phi (two HyperNets); called as
    model(x_t, t, eta) with eta (B, C*H*W)."""

    config_class = AuthorsConfig   # what machinery.checkpoint builds a saved network from

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.latent_dim = c.latent_dim
        self.g_xi = Identifier(UNetConfig(image_size=c.image_size, channels=2 * c.channels, ch=c.id_ch,
                                          ch_mult=c.id_ch_mult, num_res_blocks=c.num_res_blocks, attn_res=(),
                                          dropout=c.dropout, norm_groups=c.norm_groups), c.latent_ch)
        self.f_in = HyperNet(c.ch, c.latent_ch, c.hypernet_layers)
        self.f_out = HyperNet(self.out[0].num_channels, c.latent_ch, c.hypernet_layers)

    def output_layer(self, ch):
        return default_init_output(ch, self.channels, self.config.norm_groups)

    def forward(self, x, t, eta=None):
        if eta is None:
            raise ValueError("the authors' model needs eta ~ N(0, I) of shape (B, C*H*W): smd.Diffusion draws it")
        z = self.g_xi(torch.cat([x, eta.view(x.shape).to(x.dtype)], 1), t)   # Alg. 1 l.6: z_t = g_xi(eta, x_t, t)
        temb = self.temb(timestep_embedding(t, self.config.ch))
        h = self.conv_in(x)
        hs = [h + self.f_in(h, z)]                     # Alg. 1 l.7: f_phi(z_t)'s layer after the first conv
        for layer in self.down:
            hs.append(layer(hs[-1], temb))
        h = self.decode(hs, temb)
        return self.out(h + self.f_out(h, z))          # ... and its layer before the output layer

# -----------------------------------------------------------------------------
# the report: beyond/fashion.py's JSONs (one per T and seed) -> the table and the figure

DESIGNS = ["vanilla", "SMD", "SMD rand-init", "authors"]
COLOURS = {"SMD": (31, 119, 180), "SMD rand-init": (44, 160, 44), "authors": (214, 39, 40)}


def collect(paths):
    """{(design, T): {seed: {params, curve, eta, confident, coverage, fd_clf, fid}}} from fashion.py JSONs."""
    runs = {}
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        seed = res["config"]["seed"]
        for r in res["rows"]:
            if r["model"] not in DESIGNS:
                continue
            m = res["models"][f"{r['model']} T={r['T']}"]
            got = runs.setdefault((r["model"], r["T"]), {})
            if seed in got:
                raise ValueError(f"{path}: {r['model']} at T={r['T']}, seed {seed}, is in an earlier JSON too")
            got[seed] = dict(params=m["params"], curve=m.get("eta_curve"), eta=m["eta_sens"],
                             **{k: r.get(k) for k in ("confident", "coverage", "fd_clf", "fid")})
    return runs


def mean_se(values):
    """(mean, standard error) of a list; SE 0 for one value."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def fmt_diff(values, digits):
    """'mean +- SE' of paired differences, marked (within noise) when |mean| < 2 SE."""
    m, se = mean_se(values)
    return f"{m:+.{digits}f} +- {se:.{digits}f}" + (" (within noise)" if abs(m) < 2 * se or m == se == 0 else "")


def table(runs):
    """The report's markdown table: per T and design, parameters, seeds, eta-sensitivity at step 0
    and at the end (mean +- SE over seeds; vanilla's is 0, so these are also the paired differences
    against it), and the classifier's scores: the base's (vanilla, or SMD where no vanilla was run)
    as mean +- SE, the others' as paired differences against it (same seed, same classifier)."""
    base_name = "vanilla" if any(d == "vanilla" for d, _ in runs) else "SMD"
    scores = (("confident", 3), ("coverage", 1), ("fd_clf", 1))
    head = ["T", "design", "params", "seeds", "eta-sens step 0", "eta-sens end"] + \
        [f"{name} (- {base_name})" for name in ("confident", "coverage", "FD-clf")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for T in sorted({T for _, T in runs}, reverse=True):
        base = runs.get((base_name, T), {})
        for design in DESIGNS:
            got = runs.get((design, T))
            if not got:
                continue
            seeds = sorted(got)
            cells = [str(T), design, f"{got[seeds[0]]['params']:,}", ",".join(map(str, seeds))]
            cells += ["0", "0"] if design == "vanilla" else \
                [fmt_sens([got[s]["curve"][0][1] for s in seeds]), fmt_sens([got[s]["eta"] for s in seeds])]
            paired = [s for s in seeds if s in base]
            for key, digits in scores:
                if design == base_name:
                    m, se = mean_se([got[s][key] for s in seeds])
                    cells.append(f"{m:.{digits}f} +- {se:.{digits}f}")
                else:
                    cells.append(fmt_diff([got[s][key] - base[s][key] for s in paired], digits) if paired else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_sens(values):
    """'mean +- SE' with two significant digits in the mean; '0' when every value is 0."""
    m, se = mean_se(values)
    d = max(0, 1 - int(np.floor(np.log10(abs(m))))) if m else 0
    return "0" if not m else f"{m:.{d}f}" + (f" +- {se:.{d}f}" if len(values) > 1 else " (one seed)")


def curves(runs, T):
    """{design: (steps, mean, mean - SE, mean + SE)} of the eta-sensitivity over training at T."""
    out = {}
    for design in DESIGNS[1:]:
        got = runs.get((design, T), {})
        if got and all(r["curve"] for r in got.values()):
            steps = [s for s, _ in next(iter(got.values()))["curve"]]
            per_step = np.array([[v for _, v in r["curve"]] for r in got.values()])   # (seeds, steps)
            m = per_step.mean(0)
            se = per_step.std(0, ddof=1) / np.sqrt(len(per_step)) if len(per_step) > 1 else 0 * m
            out[design] = (steps, m, m - se, m + se)
    return out


def plot(panels, path, floor=1e-5, top=1.0, size=(420, 300)):
    """A PNG of line plots with PIL, one panel per (title, {name: (x, y, lo, hi)}): log y from
    floor to top (values below floor drawn on it, labelled '<= floor'), linear x, a band from lo
    to hi, a legend in the first panel."""
    W, H, L, B, R, Tm = *size, 62, 40, 22, 36
    img = Image.new("RGB", (W * len(panels), H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    lo_dec, hi_dec = int(np.floor(np.log10(floor))), int(np.ceil(np.log10(top)))
    for i, (title, series) in enumerate(panels):
        x0, x1, y0, y1 = i * W + L, (i + 1) * W - R, H - B, Tm
        xmax = max(max(s[0]) for s in series.values())
        px = lambda x: x0 + (x1 - x0) * x / xmax
        py = lambda y: y0 - (y0 - y1) * (np.log10(max(y, floor)) - lo_dec) / (hi_dec - lo_dec)
        draw.rectangle([x0, y1, x1, y0], outline=(0, 0, 0))
        draw.text((i * W + 8, 4), title, fill=0)
        for d in range(lo_dec, hi_dec + 1):
            y = py(10.0**d)
            draw.line([x0, y, x1, y], fill=(225, 225, 225))
            draw.text((x0 - 44, y - 6), f"<=1e{d}" if d == lo_dec else f"1e{d}", fill=0)
        for k in range(5):
            x = round(xmax * k / 4)
            draw.line([px(x), y0, px(x), y0 + 4], fill=0)
            draw.text((px(x) - 10, y0 + 6), str(x), fill=0)
        draw.text(((x0 + x1) // 2 - 40, H - 16), "training step", fill=0)
        draw.text((i * W + 8, 20), "eta-sensitivity (log scale)", fill=0)
        for j, (name, (xs, ys, lo, hi)) in enumerate(series.items()):
            colour = COLOURS.get(name, (0, 0, 0))
            light = tuple(c + (255 - c) * 3 // 4 for c in colour)
            band = [(px(x), py(v)) for x, v in zip(xs, hi)] + [(px(x), py(v)) for x, v in zip(xs[::-1], lo[::-1])]
            draw.polygon(band, fill=light)
            draw.line([(px(x), py(y)) for x, y in zip(xs, ys)], fill=colour, width=2)
            if i == 0:
                draw.line([x1 - 120, y1 + 12 + 14 * j, x1 - 100, y1 + 12 + 14 * j], fill=colour, width=2)
                draw.text((x1 - 95, y1 + 6 + 14 * j), name, fill=colour)
    img.save(path)


def main(argv=None):
    p = cli.Parser(__doc__, prog="python -m beyond.authors")
    p.add_argument("--report", nargs="+", required=True, metavar="JSON",
                   help="beyond/fashion.py results (one run per T and seed, or several holding different models)")
    p.add_argument("--png", default=None, help="the eta-sensitivity figure (default: none)")
    args = p.parse_args(argv)
    try:
        runs = collect(args.report)
    except (OSError, ValueError, KeyError, TypeError) as e:
        cli.fail(p.prog, f"--report: {e}")
    print(table(runs))
    if args.png:
        Ts = sorted({T for _, T in runs}, reverse=True)
        title = lambda T: f"T = {T}: " + ", ".join(f"{d} {len(got)} seed{'s' * (len(got) > 1)}" for (d, t), got in
                                                  runs.items() if t == T and d != "vanilla") + " (band: +- SE)"
        plot([(title(T), curves(runs, T)) for T in Ts if curves(runs, T)], args.png)
    return runs


if __name__ == "__main__":
    main()
