"""
beyond/train.py -- train the categorical mixture denoiser (beyond/categorical.py), or with --model
authors the SMD authors' g_xi and f_phi around the U-Net (beyond/authors.py), on an image dataset,
through train.py's machinery: the same flags, run folder, resume, DDP and logs (machinery/run.py)
and train.py's loop. The categorical model brings its own chain (CategoricalDiffusion: the exact
mixture likelihood) and the annealed responsibilities' temperature; the authors' model is trained
by Algorithm 1 and sampled by Algorithm 2 as in smd.py (smd.Diffusion draws its image-shaped eta).

    python -m beyond.train --dataset fashion-mnist --components 10 --learned-var --anneal 1e6 --T 5
    python -m beyond.train --dataset cifar10 --components 10 --learned-var --anneal 1e6 --T 10 --out-dir out/cat10
    python -m beyond.train --resume --out-dir out/cat10
    python sample.py --ckpt out/cat10 --var small --steps 10    # the checkpoint says which model it holds
    python -m beyond.train --model authors --dataset fashion-mnist --image-size 16 --ch 32 --ch-mult 1,2,2 \
        --num-res-blocks 1 --attn-res "" --dropout 0 --norm-groups 4 --batch-size 64 --lr 2e-3 --warmup 60 \
        --T 5 --max-steps 1200 --out-dir out/authors_T5     # --resume needs --model authors again
    python sample.py --ckpt out/authors_T5 --var small --eta-sensitivity 64

Every train.py flag works here except --smd and --eta-samples (the SMD model's) and --init (DDPM's
published weights), which are refused, and so are --latent-dim with --model authors (its eta has
the image's shape) and the categorical flags with it.
"""

import copy

import torch

import smd
import train
from beyond.authors import AuthorsUNet
from beyond.categorical import TEMPERATURE, AnnealedDiffusion, CategoricalDiffusion, CategoricalUNet
from machinery import cli
from machinery.run import Run

PROG = "python -m beyond.train"
NOT_HERE = ("smd", "eta_samples", "init")   # train.py's flags of the paper's model
MODELS = {"categorical": CategoricalUNet, "authors": AuthorsUNet}
NOT_AUTHORS = ("latent_dim", "components", "learned_var", "anneal")   # flags --model authors refuses


def get_parser():
    p = train.get_parser()
    p.prog, p.description = PROG, __doc__
    p.add_argument("--model", choices=sorted(MODELS), default="categorical",
                   help="categorical: K Gaussians per step; authors: SMD with the authors' g_xi and f_phi")
    p.add_argument("--components", type=cli.positive_int, default=10, help="K Gaussians per reverse step")
    p.add_argument("--learned-var", action="store_true", help="learn each component's variance (else beta_tilde)")
    p.add_argument("--anneal", type=TEMPERATURE, default=1.0, metavar="TAU0",
                   help="anneal the responsibilities' temperature from TAU0 to 1 over the first half of --max-steps "
                        "(against dead components; 1: off)")
    return p


def build(args, cfg, run):
    """train.build with the run's network (categorical or the authors') and its chain."""
    torch.manual_seed(args.seed)
    model = run.model_class(cfg).to(run.device, memory_format=torch.channels_last if run.device.type == "cuda"
                                    else torch.preserve_format)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = smd.make_optimizer(model, args.lr, run.device)
    diffusion = smd.Diffusion(args.T, args.schedule, args.objective) if args.model == "authors" else \
        AnnealedDiffusion(args.T, args.schedule, args.objective, args.anneal, args.max_steps, run.start)
    run.restore(model, ema, optimizer)
    return model, ema, optimizer, diffusion.to(run.device)


def main(argv=None):
    parser = get_parser()
    model_name = parser.parse_args(argv).model   # --help, and the flags' own checks, first
    explicit = cli.explicit_args(parser, argv)
    given = [cli.flag(parser, k) for k in explicit if k in NOT_HERE]
    if given:
        cli.fail(PROG, f"{', '.join(given)}: not for the {model_name} model (they are the SMD model's, or start "
                       f"from DDPM's published weights): use train.py for those")
    given = [cli.flag(parser, k) for k in explicit if k in NOT_AUTHORS]
    if model_name == "authors" and given:
        cli.fail(PROG, f"{', '.join(given)}: not for --model authors (its eta has the image's shape; the others are "
                       f"the categorical model's)")
    run = Run(parser, argv, MODELS[model_name])
    try:
        data, cfg, _ = run.load_data()
        model, ema, optimizer, diffusion = build(run.args, cfg, run)
        chain = smd.Diffusion if model_name == "authors" else CategoricalDiffusion
        run.begin(model, ema, optimizer, chain)   # the chain that samples it
        step = train.train(run.args, run, run.wrap(model), model, ema, optimizer, diffusion, data)
        status = run.finish(step)
    finally:
        run.close()
    if status:
        raise SystemExit(status)
    return {"model": model, "ema": ema, "step": step, "losses": run.history}


if __name__ == "__main__":
    main()
