"""
beyond/train.py -- train the categorical mixture denoiser (beyond/categorical.py) on an image
dataset, through train.py's machinery: the same flags, run folder, resume, DDP and logs
(machinery/run.py) and train.py's loop, with its own network (CategoricalUNet), chain
(CategoricalDiffusion: the exact mixture likelihood) and the annealed responsibilities'
temperature.

    python -m beyond.train --dataset fashion-mnist --components 10 --learned-var --anneal 1e6 --T 5
    python -m beyond.train --dataset cifar10 --components 10 --learned-var --anneal 1e6 --T 10 --out-dir out/cat10
    python -m beyond.train --resume --out-dir out/cat10
    python sample.py --ckpt out/cat10 --var small --steps 10    # the checkpoint says which model it holds

Every train.py flag works here except --smd and --eta-samples (the SMD model's) and --init (DDPM's
published weights), which are refused.
"""

import copy

import torch

import smd
import train
from beyond.categorical import TEMPERATURE, AnnealedDiffusion, CategoricalDiffusion, CategoricalUNet
from machinery import cli
from machinery.run import Run

PROG = "python -m beyond.train"
NOT_HERE = ("smd", "eta_samples", "init")   # train.py's flags of the paper's model


def get_parser():
    p = train.get_parser()
    p.prog, p.description = PROG, __doc__
    p.add_argument("--components", type=cli.positive_int, default=10, help="K Gaussians per reverse step")
    p.add_argument("--learned-var", action="store_true", help="learn each component's variance (else beta_tilde)")
    p.add_argument("--anneal", type=TEMPERATURE, default=1.0, metavar="TAU0",
                   help="anneal the responsibilities' temperature from TAU0 to 1 over the first half of --max-steps "
                        "(against dead components; 1: off)")
    return p


def build(args, cfg, run):
    """train.build with the categorical network and chain."""
    torch.manual_seed(args.seed)
    model = CategoricalUNet(cfg).to(run.device, memory_format=torch.channels_last if run.device.type == "cuda"
                                    else torch.preserve_format)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = smd.make_optimizer(model, args.lr, run.device)
    diffusion = AnnealedDiffusion(args.T, args.schedule, args.objective, args.anneal, args.max_steps, run.start)
    run.restore(model, ema, optimizer)
    return model, ema, optimizer, diffusion.to(run.device)


def main(argv=None):
    parser = get_parser()
    parser.parse_args(argv)   # --help, and the flags' own checks, first
    given = [cli.flag(parser, k) for k in cli.explicit_args(parser, argv) if k in NOT_HERE]
    if given:
        cli.fail(PROG, f"{', '.join(given)}: not for the categorical model (they are the SMD model's, or start "
                       f"from DDPM's published weights): use train.py for those")
    run = Run(parser, argv, CategoricalUNet)
    try:
        data, cfg, _ = run.load_data()
        model, ema, optimizer, diffusion = build(run.args, cfg, run)
        run.begin(model, ema, optimizer, CategoricalDiffusion)   # the chain that samples it
        step = train.train(run.args, run, run.wrap(model), model, ema, optimizer, diffusion, data)
        status = run.finish(step)
    finally:
        run.close()
    if status:
        raise SystemExit(status)
    return {"model": model, "ema": ema, "step": step, "losses": run.history}


if __name__ == "__main__":
    main()
