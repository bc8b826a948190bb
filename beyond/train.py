"""
beyond/train.py -- train the categorical mixture denoiser (beyond/categorical.py) on an image
dataset, through train.py's machinery: the same flags, run folder, resume, DDP and logs, with
its own network (CategoricalUNet), chain (CategoricalDiffusion: the exact mixture likelihood)
and the annealed responsibilities' temperature as the loss's argument.

    python -m beyond.train --dataset fashion-mnist --components 10 --learned-var --anneal 1e6 --T 5
    python -m beyond.train --dataset cifar10 --components 10 --learned-var --anneal 1e6 --T 10 --out-dir out/cat10
    python -m beyond.train --resume --out-dir out/cat10
    python sample.py --ckpt out/cat10 --var small --steps 10    # the checkpoint says which model it holds

Every train.py flag works here except --smd and --eta-samples (the SMD model's) and --init (DDPM's
published weights), which are refused.
"""

import cli
import train
from beyond.categorical import TEMPERATURE, CategoricalDiffusion, CategoricalUNet, temperature

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


def main(argv=None):
    parser = get_parser()
    parser.parse_args(argv)   # --help, and the flags' own checks, first
    given = [cli.flag(parser, k) for k in cli.explicit_args(parser, argv) if k in NOT_HERE]
    if given:
        cli.fail(PROG, f"{', '.join(given)}: not for the categorical model (they are the SMD model's, or start "
                       f"from DDPM's published weights): use train.py for those")
    return train.main(argv, parser, CategoricalUNet, CategoricalDiffusion,
                      loss_args=lambda args, step: {"tau": temperature(step, args.max_steps, args.anneal)})


if __name__ == "__main__":
    main()
