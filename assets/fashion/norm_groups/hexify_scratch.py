"""Re-encode a fashion.py results JSON written with samples as nested lists (the first version
of d35cfc7) into the hex form fashion.py writes now; every other key unchanged."""
import json, sys
import torch
sys.path.insert(0, "/work/main")
import data
for path in sys.argv[1:]:
    res = json.load(open(path))
    res["samples"] = [[n, T, x if isinstance(x, str) else torch.tensor(x, dtype=torch.uint8).numpy().tobytes().hex()]
                      for n, T, x in res["samples"]]
    data.save_json(res, path)
