# scratch: train (or load) a fashion.py categorical model, sample it with and without --draw-snr (the repo's sampler).
# python diag11_scratch.py SNAPDIR OUTDIR all,snr0.1 [fashion flags...]   (SNAPDIR: a copy of the repository)
import json, os, sys, time
snap, outdir, variants = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
sys.path.insert(0, snap)
import torch
import fashion, fashion_classifier, fid, inception, data
from categorical import make_diffusion, train_loop

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

diag = make_diffusion(cfg, T, objective, args)
results = {}
for v in variants:
    diag.draw_snr = None if v == "all" else float(v[3:])   # "all" or "snrX"
    g = torch.Generator().manual_seed(args.seed * 100003 + 1000 * T + 1)
    t0 = time.time()
    x = fashion.sample(model, diag, args.n, 16, args.var, g)
    pr, fe = fashion_classifier.classify(clf, x)
    row = dict(**fashion_classifier.class_metrics(pr), fd_clf=fashion.frechet_to(fe, *clf_ref))
    row["fid"] = fashion.frechet_to(inception.features(net, fashion.nhwc(x), batch_size=100), *fid_ref)
    row["seconds"] = time.time() - t0
    results[v] = row
    fashion.tile(x[:16], scale=4).save(os.path.join(outdir, f"{v}.png"))
    print(v, json.dumps(row), flush=True)
    data.save_json(results, os.path.join(outdir, f"diag_{'_'.join(variants)}.json"))
