# scratch: fashion.py with every GroupNorm at gcd(G, ch) groups instead of gcd(32, ch).  python normrun.py SNAP G fashion-args...
import math, sys
snap, G = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, snap)
import torch.nn as nn
import unet, categorical, fashion
norm = lambda ch: nn.GroupNorm(math.gcd(G, ch), ch, eps=1e-6)
unet.norm = categorical.norm = norm
fashion.main(sys.argv[3:])
