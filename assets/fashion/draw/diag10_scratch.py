# scratch: where does the T=10 categorical model lose FID? train (or load) it, sample variants.
# python diag10_scratch.py SNAPDIR OUTDIR pi,mean,argmax [fashion flags...]   (SNAPDIR: a copy of the repository)
import json, math, os, sys, time
snap, outdir, variants = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
sys.path.insert(0, snap)
import torch
import fashion, fashion_classifier, fid, inception, data
from categorical import CategoricalDiffusion, make_diffusion, train_loop
from smd import ddpm_update
if os.environ.get("NORM_G"):   # every GroupNorm at gcd(G, ch) groups instead of gcd(32, ch)
    import torch.nn as nn, unet, categorical
    G = int(os.environ["NORM_G"])
    unet.norm = categorical.norm = lambda ch: nn.GroupNorm(math.gcd(G, ch), ch, eps=1e-6)

args = fashion.get_parser().parse_args(sys.argv[4:])
fashion.check_args(args)
torch.set_num_threads(1)
os.makedirs(outdir, exist_ok=True)
T = args.T[0]
x_train, y_train = fashion.load_split(args.data_dir, "train", 16)
x_test, y_test = fashion.load_split(args.data_dir, "test", 16)
net = inception.load_inception(args.fid_weights)
clf_path = os.path.join(outdir, "clf.pt")
if os.path.exists(clf_path):
    clf = fashion_classifier.Classifier(); clf.load_state_dict(torch.load(clf_path)); clf.eval()
else:
    clf = fashion_classifier.train_classifier(x_train, y_train, args.classifier_iters, args.seed)
    torch.save(clf.state_dict(), clf_path)
probs, feats = fashion_classifier.classify(clf, x_test)
cache = os.path.join(args.out_dir, "fid_ref_test_16px_n10000_default_1.npz")
fid_ref = fashion.reference_stats(net, x_test, cache)
clf_ref = fid.stats(feats)

specs = fashion.model_specs(args)
(name, (cfg, objective)), = [(k, v) for k, v in specs.items() if k.startswith("categorical")]
diffusion = make_diffusion(cfg, T, objective, args)
model_path = os.path.join(outdir, "model.pt")
torch.manual_seed(args.seed)
model = fashion.build(cfg)
if os.path.exists(model_path):
    model.load_state_dict(torch.load(model_path))
else:
    train_x = x_train
    draw = lambda n, g: fashion.to_model(train_x[torch.randint(len(train_x), (n,), generator=g)])
    loss, ms = train_loop(model, diffusion, draw, args, f"T={T} {name}")
    torch.save(model.state_dict(), model_path + ".tmp"); os.replace(model_path + ".tmp", model_path)
    print(f"trained: loss {loss:.4f}, {ms:.0f} ms/step", flush=True)
model.eval()

stats = {}


def choose(variant, x0_k, log_pi, t, k_drawn):
    pi = log_pi.exp()
    mean = (pi.view(*pi.shape, 1, 1, 1) * x0_k).sum(1)
    rows = torch.arange(x0_k.shape[0])
    if variant in ("pi", "fitpi"):
        return x0_k[rows, k_drawn]
    if variant == "argmax":
        return x0_k[rows, log_pi.argmax(1)]
    if variant == "mean":
        return mean
    if variant == "mix_first":      # mixture on the first half of the chain (t >= T/2), mean after
        return x0_k[rows, k_drawn] if t >= T // 2 else mean
    if variant.startswith("mix"):   # mixNN: mixture at the first NN steps, mean after
        return x0_k[rows, k_drawn] if t >= T - int(variant[3:]) else mean
    if variant == "mean_first":     # mean on the first half, mixture after
        return mean if t >= T // 2 else x0_k[rows, k_drawn]
    raise ValueError(variant)


class Diag(CategoricalDiffusion):
    variant = "pi"

    @torch.no_grad()
    def sample(self, model, shape, steps=None, var="small", generator=None, x_T=None, update=None):
        x = torch.randn(shape, generator=generator)
        u = torch.zeros(x.shape[0], 1)
        for t, abar, abar_prev in self.step_coefficients(steps):
            noise = torch.randn(x.shape, dtype=x.dtype, generator=generator)
            x0_k, log_pi, _ = self.mixture(model, x, torch.full((x.shape[0],), t, dtype=torch.long))
            torch.rand(u.shape, generator=generator, out=u)
            k = (log_pi.float().exp().cumsum(1) < u).sum(1).clamp(max=x0_k.shape[1] - 1)
            pi = log_pi.exp()
            s = stats.setdefault(t, dict(entropy=0.0, maxpi=0.0, drawn_is_argmax=0.0, spread=0.0, n=0))
            s["entropy"] += -(pi * log_pi.clamp_min(-1e30)).sum(1).sum().item()
            s["maxpi"] += pi.max(1).values.sum().item()
            s["drawn_is_argmax"] += (k == log_pi.argmax(1)).double().sum().item()
            mean = (pi.view(*pi.shape, 1, 1, 1) * x0_k).sum(1)
            s["spread"] += (pi.view(*pi.shape, 1, 1, 1) * (x0_k - mean[:, None]).pow(2)).sum(1).flatten(1).mean(1).sum().item()
            s["n"] += x.shape[0]
            x0 = choose(self.variant, x0_k, log_pi, t, k).to(x.dtype)
            eps_hat = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
            x = ddpm_update(x, eps_hat, noise, abar, abar_prev, var=var)
        return x.clamp(-1, 1)


diag = Diag(T, objective=objective, cap=args.nll_cap, mean_loss=args.mean_loss, fit_pi=args.fit_pi)
results = {}
for v in variants:
    stats.clear()
    diag.variant = v
    diag.fit_pi = args.fit_pi or v == "fitpi"
    g = torch.Generator().manual_seed(args.seed * 100003 + 1000 * T + 1)
    t0 = time.time()
    x = fashion.sample(model, diag, args.n, 16, args.var, g)
    pr, fe = fashion_classifier.classify(clf, x)
    row = dict(**fashion_classifier.class_metrics(pr), fd_clf=fashion.frechet_to(fe, *clf_ref))
    row["fid"] = fashion.frechet_to(inception.features(net, fashion.nhwc(x), batch_size=100), *fid_ref)
    row["per_step"] = {t: {k: s[k] / s["n"] for k in s if k != "n"} for t, s in stats.items()}
    row["seconds"] = time.time() - t0
    results[v] = row
    fashion.tile(x[:16], scale=4).save(os.path.join(outdir, f"{v}.png"))
    torch.save(x, os.path.join(outdir, f"{v}_samples.pt"))
    print(v, json.dumps({k: row[k] for k in row if k != "per_step"}), flush=True)
    for t in sorted(row["per_step"], reverse=True):
        print("  t", t, {k: round(val, 4) for k, val in row["per_step"][t].items()}, flush=True)
    data.save_json(results, os.path.join(outdir, f"diag_{'_'.join(variants)}.json"))
