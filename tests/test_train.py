"""train.py on CPU with tiny models: every data path, resume, atomic checkpoints, Ctrl-C,
NaN handling, DDP with gloo, and a loss that clearly drops on real Fashion-MNIST.

This file is also the torchrun worker of test_ddp_gloo_ranks_stay_identical (see the end)."""

import gzip
import os
import re
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from machinery import checkpoint
from machinery import run as run_module
from machinery.run import check_args
from machinery import data
import smd
import train
from conftest import ENV, SMALL_CONFIG, ROOT, TINY, diffusers_model, save_hub_files, write_cifar10

pytestmark = pytest.mark.usefixtures("one_thread")
FASHION = "/usr/share/datasets/fashion-mnist"
HAS_FASHION = os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz"))


def run(out, *argv):
    return train.main(["--out-dir", str(out), *TINY, *argv])


def refusal(capsys, argv, tiny=True):
    """The one line train.py refuses argv with (exit status 2, nothing else on stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, *argv] if tiny else argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("train.py: ") and err.count("\n") == 1, err
    return err


def write_idx(path, array):
    """An IDX file as MNIST ships it: 0, 0, type 0x08 (uint8), ndim, big-endian sizes, data."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(data)


@pytest.fixture
def offline(monkeypatch):
    """Any torchvision dataset call (the only way train.py downloads) fails, as offline."""
    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted")
    for name in ("CIFAR10", "MNIST", "FashionMNIST"):
        monkeypatch.setattr(torchvision.datasets, name, refuse)


def test_cifar10_files(tmp_path, offline):
    images = write_cifar10(tmp_path / "data", n_per_batch=8)
    x = data.load_images("cifar10", str(tmp_path / "data"))
    assert x.shape == (40, 3, 32, 32) and x.dtype == np.uint8 and np.array_equal(x, images)
    r = run(tmp_path / "out", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--max-steps", "2")
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == r["step"] == 2 and ckpt["model_config"]["channels"] == 3 and ckpt["config"]["flip"]
    assert set(ckpt) == {"model", "ema", "optimizer", "step", "config", "model_config", "rng", "model_class",
                         "diffusion_class"}
    assert (ckpt["model_class"], ckpt["diffusion_class"]) == ("unet.UNet", "smd.Diffusion")   # what load_checkpoint builds
    assert "ch" not in ckpt["config"] and ckpt["model_config"]["ch"] == 32   # one home for the network's shape


def test_mnist_format_files(tmp_path, offline):
    digits = np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    write_idx(str(tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte"), digits)        # as extracted
    write_idx(str(tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz"), digits)  # as downloaded
    for name in ("mnist", "fashion-mnist"):   # data_dir wins over /usr/share/datasets
        x = data.load_images(name, str(tmp_path / "data"))
        assert x.shape == (12, 1, 32, 32) and np.array_equal(x[:, 0, 2:30, 2:30], digits)
        assert x[:, :, :2].max() == x[:, :, 30:].max() == x[:, :, :, :2].max() == 0   # zero padding
    r = run(tmp_path / "out", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--max-steps", "2",
            "--norm-groups", "4")
    assert r["model_config"].channels == 1 and r["config"]["flip"] is False   # no flips for digits
    assert r["model_config"].norm_groups == 4 and "norm_groups" not in r["config"]
    assert "on 1 x cpu (1 thread), compile=False" in (tmp_path / "out" / "log.txt").read_text()


def test_missing_data_offline_says_where(tmp_path, offline, capsys):
    with pytest.raises(RuntimeError, match=r"MNIST/raw.*downloading it failed"):
        data.load_images("mnist", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"cifar-10-batches-py.*download https://www.cs.toronto.edu/~kriz/"
                                           r"cifar-10-python.tar.gz and extract it into .*tar xzf"):
        data.load_images("cifar10", str(tmp_path))
    assert re.search(r"train.py: cifar10: no data in .*cifar-10-batches-py", refusal(capsys, ["--out-dir", str(tmp_path / "out"), "--dataset", "cifar10", "--data-dir", str(tmp_path)]))
    assert re.search("neither cifar10", refusal(capsys, ["--out-dir", str(tmp_path / "out"), "--dataset", str(tmp_path / "no-such-folder")]))


def test_image_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i, (w, h) in enumerate([(40, 30), (20, 50), (33, 33), (64, 48), (30, 40), (50, 50)]):
        path = tmp_path / "imgs" / ("sub" if i % 2 else "") / f"{i}.{'png' if i % 3 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    ds = data.ImageFolder(str(tmp_path / "imgs"), 16)
    assert len(ds) == 6 and ds.channels == 3
    x = ds[(0, False)]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and torch.equal(ds[(0, True)], x.flip(-1))
    (tmp_path / "gray").mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(tmp_path / "gray" / "a.png")
    assert data.ImageFolder(str(tmp_path / "gray"), 8)[(0, False)].shape == (1, 8, 8)
    r = run(tmp_path / "out", "--dataset", str(tmp_path / "imgs"), "--image-size", "16", "--max-steps", "2")
    assert r["model_config"].image_size == 16 and r["model_config"].channels == 3


@pytest.mark.skipif(not HAS_FASHION, reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_offline(tmp_path, offline):
    x = data.load_images("fashion-mnist", str(tmp_path / "empty"))
    assert x.shape == (60000, 1, 32, 32) and x.dtype == np.uint8
    assert abs(x[:, :, 2:30, 2:30].mean() - 0.2860 * 255) < 0.5   # Fashion-MNIST's known mean


@pytest.mark.skipif(not HAS_FASHION, reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_loss_drops(tmp_path, offline):
    """100 steps of batch 8 (~35 s on a busy CPU core): the mean loss of the last 25 steps is
    well under half that of the first 25, and far under 1.0, the loss of the untrained model."""
    r = run(tmp_path / "out", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "empty"), "--T", "1000",
            "--ch-mult", "1,1", "--batch-size", "8", "--lr", "2e-3", "--warmup", "10", "--max-steps", "100",
            "--log-every", "25")
    losses = [loss for _, loss in r["losses"]]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0] and losses[-1] < 0.15, losses


def test_batch_plan_shards_epochs_and_resumes():
    plan = [data.batch_plan(20, 2, rank, 2, seed=0, step=0) for rank in range(2)]
    first_epoch = torch.cat([next(p)[0] for _ in range(5) for p in plan])
    assert sorted(first_epoch.tolist()) == list(range(20))   # ranks share no image, epoch covers all
    again = data.batch_plan(20, 2, 0, 2, seed=0, step=7)    # a resumed plan = the same batches
    for _ in range(2):
        next(plan[0])
    for _ in range(3):
        a, b = next(plan[0]), next(again)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_ema_update_and_warmup():
    ema, p = [torch.zeros(3), torch.ones(2)], [torch.ones(3), torch.full((2,), 3.0)]
    smd.ema_update(ema, p, 0.75)
    assert torch.allclose(ema[0], torch.full((3,), 0.25)) and torch.allclose(ema[1], torch.full((2,), 1.5))
    assert smd.ema_decay(0) == 0.1 and smd.ema_decay(10**6) == 0.9999


def test_resume_equals_uninterrupted(tmp_path, capsys):
    write_cifar10(tmp_path / "data", n_per_batch=2)   # 10 images: 6 steps of 4 cross 3 epochs
    common = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--smd", "--dropout", "0.1"]
    a = run(tmp_path / "a", *common, "--max-steps", "6")
    run(tmp_path / "b", *common, "--max-steps", "3")
    b = run(tmp_path / "b", *common, "--max-steps", "6", "--resume")
    assert "resumed at step 3" in capsys.readouterr().out and b["step"] == 6
    log = (tmp_path / "b" / "log.txt").read_text()
    assert log.count("==== ") == 2 and "new run from step 0" in log and "finished at step 3" in log
    for key in ("model", "ema"):
        sa, sb = a[key].state_dict(), b[key].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), key
    oa, ob = a["optimizer"].state_dict()["state"], b["optimizer"].state_dict()["state"]
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    assert [l for _, l in a["losses"][3:]] == [l for _, l in b["losses"]]


def test_resume_refuses_contradictions(tmp_path, cifar_dir, capsys):
    data = ["--dataset", "cifar10", "--data-dir", cifar_dir]
    run(tmp_path / "out", *data, "--max-steps", "2")
    assert re.search(r"contradicts .*--smd True \(checkpoint: False\)", refusal(capsys, ["--out-dir", str(tmp_path / "out"), *data, "--max-steps", "4", "--resume", "--smd"]))
    assert re.search(r"--ch 64 \(checkpoint: 32\)", refusal(capsys, ["--out-dir", str(tmp_path / "out"), *data, "--max-steps", "4", "--resume", "--ch", "64"]))
    assert re.search("exists: pass --resume", refusal(capsys, ["--out-dir", str(tmp_path / "out"), *data, "--max-steps", "4"]))
    with pytest.raises(SystemExit):
        run(tmp_path / "elsewhere", *data, "--resume")
    assert "no checkpoint at" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)   # a checkpoint of another model
    (tmp_path / "other").mkdir()
    torch.save({**ckpt, "model_class": "beyond.categorical.CategoricalUNet"}, tmp_path / "other" / "ckpt.pt")
    assert re.search(r"holds a beyond.categorical.CategoricalUNet, this script trains a unet.UNet: resume it with the "
                     r"command that started it", refusal(capsys, ["--out-dir", str(tmp_path / "other"), "--resume",
                                                                  "--max-steps", "4"], tiny=False))
    r = train.main(["--out-dir", str(tmp_path / "out"), "--resume", "--max-steps", "3"])   # the rest from ckpt
    assert r["step"] == 3 and r["model_config"].ch == 32 and r["config"]["data_dir"] == cifar_dir


def test_init_from_ddpm_weights_starts_smd_exactly_at_ddpm(tmp_path, cifar_dir, capsys):
    """--init with diffusers' files (random weights, a small config): the SMD model starts as
    the DDPM model (f_phi's last layer is zero), its checkpoint says where it started, and
    flags that would change the network or the chain are refused."""
    small = dict(SMALL_CONFIG, in_channels=3, out_channels=3)
    theirs = diffusers_model(small)
    folder = save_hub_files(str(tmp_path / "ddpm"), theirs, small)
    common = ["--dataset", "cifar10", "--data-dir", cifar_dir, "--init", folder, "--batch-size", "4",
              "--sample-every", "0", "--log-every", "1"]
    assert re.search("fix the network and the chain .*: drop --ch", refusal(capsys, [*common, "--out-dir", str(tmp_path / "x"), "--ch", "64"], tiny=False))
    assert re.search("drop --T", refusal(capsys, [*common, "--out-dir", str(tmp_path / "x"), "--T", "100"], tiny=False))
    assert not (tmp_path / "x").exists()   # refused before the run folder was made
    r = train.main([*common, "--out-dir", str(tmp_path / "out"), "--smd", "--latent-dim", "8", "--lr", "0",
                    "--max-steps", "1"])   # lr 0: the weights stay those of the start
    assert f"initialised from diffusers UNet2DModel {folder}" in capsys.readouterr().out
    model, _, info = checkpoint.load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    assert info["smd"] and info["init"] == folder and r["model_config"].ch_mult == (1, 2)
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0, 400, 999])
    with torch.no_grad():
        want = theirs(x, t).sample
        for eta in (torch.zeros(3, 8), torch.randn(3, 8)):
            assert (model(x, t, eta) - want).abs().max() < 1e-5 * want.abs().max()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, cifar_dir, monkeypatch):
    calls, loss = [], smd.Diffusion.loss

    def nan_from_5th_call(self, *args, **kwargs):
        calls.append(1)
        return loss(self, *args, **kwargs) * (float("nan") if len(calls) >= 5 else 1.0)
    monkeypatch.setattr(smd.Diffusion, "loss", nan_from_5th_call)
    with pytest.raises(SystemExit, match=r"non-finite loss at step 5; .* last good checkpoint is .*ckpt.pt \(step 4\)"):
        run(tmp_path / "out", "--dataset", "cifar10", "--data-dir", cifar_dir, "--max-steps", "8",
            "--ckpt-every", "2", "--log-every", "100")
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(v.isfinite().all() for v in [*ckpt["model"].values(), *ckpt["ema"].values()])


def test_killed_writer_leaves_old_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    child = ("import sys, time, torch\nfrom machinery import checkpoint\n"
             "def stuck(obj, f):\n"
             "    f.write(b'half a checkpoint'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
             "torch.save = stuck\n"
             f"checkpoint.save_checkpoint({{'step': 2}}, {path!r})\n")
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    assert p.stdout.readline().strip() == "writing"
    p.kill()   # SIGKILL mid-write
    p.wait()
    tmp = [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]
    assert len(tmp) == 1 and os.path.getsize(os.path.join(os.path.dirname(path), tmp[0])) > 0   # the killed write
    assert torch.load(path, weights_only=True)["step"] == 1   # the old checkpoint, intact
    checkpoint.save_checkpoint({"step": 3}, path)              # and the next save replaces it
    assert torch.load(path, weights_only=True)["step"] == 3


def test_ctrl_c_saves_a_checkpoint(tmp_path, cifar_dir):
    cmd = [sys.executable, "train.py", "--dataset", "cifar10", "--data-dir", cifar_dir, "--out-dir",
           str(tmp_path / "out"), *TINY, "--max-steps", "100000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
    for line in p.stdout:
        if line.startswith("step 2/"):
            p.send_signal(signal.SIGINT)
            break
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130 and "saved" in out, out   # 130: stopped by Ctrl-C, not finished
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert 2 <= ckpt["step"] < 100000


def torchrun(tmp_path, out, dump, *argv):
    """A 2-rank CPU (gloo) train.py run through torchrun, each rank dumping its weights into dump/."""
    (tmp_path / dump).mkdir(exist_ok=True)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
            "--dump", str(tmp_path / dump), "--out-dir", str(tmp_path / out), *TINY, "--smd", "--device", "cpu", *argv]


def rank_pids(parent):
    """{RANK: pid} of the workers torchrun started (read from /proc)."""
    pids = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        rank = next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)
        if ppid == parent and rank is not None:
            pids[int(rank)] = int(pid)
    return pids


def test_ddp_gloo_sigterm_to_one_rank_then_resume_is_exact(tmp_path, cifar_dir):
    """Two ranks (torchrun, gloo) stay identical; SIGTERM to rank 1 alone stops both after the
    same step, with one checkpoint holding both ranks' RNG states and one log, and the resumed
    run ends bit for bit where the uninterrupted one does."""
    data = ["--dataset", "cifar10", "--data-dir", cifar_dir, "--max-steps", "12", "--ckpt-every", "1000"]
    p = subprocess.run(torchrun(tmp_path, "a", "dump_a", *data), capture_output=True, text=True, env=ENV, cwd=ROOT,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("step 12/12") == 1   # only rank 0 logs
    first = subprocess.Popen(torchrun(tmp_path, "b", "dump_b", *data), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
    for line in first.stdout:
        if line.startswith("step 2/"):
            os.kill(rank_pids(first.pid)[1], signal.SIGTERM)
            break
    out = line + first.communicate(timeout=300)[0]   # both ranks exit 143 (torchrun itself 1, naming it)
    assert first.returncode != 0 and "stopped by SIGTERM" in out and "exitcode  : 143" in out, out
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert 2 <= ckpt["step"] < 12 and len(ckpt["rng"]) == 2, ckpt["step"]
    assert sorted(os.listdir(tmp_path / "b")) == [".lock", "ckpt.pt", "log.txt"]   # one checkpoint, one log
    p = subprocess.run(torchrun(tmp_path, "b", "dump_b", *data, "--resume"), capture_output=True, text=True, env=ENV,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0 and f"resumed at step {ckpt['step']}" in p.stdout, p.stdout + p.stderr
    log = (tmp_path / "b" / "log.txt").read_text()
    assert log.count("==== ") == 2 and log.count("step 2/12") == 1 and "finished at step 12" in log
    dumps = [torch.load(tmp_path / d / f"rank{r}.pt", weights_only=True) for d in ("dump_a", "dump_b") for r in (0, 1)]
    for key in ("model", "ema"):   # both ranks of both runs: one set of weights
        assert all(torch.equal(dumps[0][key][k], d[key][k]) for d in dumps[1:] for k in dumps[0][key]), key


@pytest.mark.parametrize("argv, says", [
    (["--batch-size", "-4"], "--batch-size: -4 is out of range"), (["--batch-size", "0"], "--batch-size: 0 is out"),
    (["--ckpt-every", "0"], "--ckpt-every: 0"), (["--log-every", "0"], "--log-every: 0"),
    (["--sample-n", "0"], "--sample-n: 0"), (["--T", "1"], "--T: 1 is out of range"), (["--lr", "-1"], "--lr: -1 is out of range"),
    (["--dropout", "1.5"], "--dropout: 1.5"), (["--ch", "0"], "--ch: 0"),
    (["--ema-decay", "-1"], "--ema-decay: -1"), (["--eta-samples", "0"], "--eta-samples: 0"),
    (["--max-steps", "0"], "--max-steps: 0"), (["--lr", "nan"], "--lr: nan"), (["--batch-size", "x"], "not an integer"),
    (["--attn-res", "7"], "--attn-res [7]: the U-Net's resolutions are [32, 16]"),
    (["--sample-every", "5", "--sample-steps", "1"], "--sample-steps: 1 is out of range"),
    (["--sample-every", "5", "--sample-steps", "200"], "--sample-steps 200: the chain has only --T 100"),
    (["--image-size", "64"], "--image-size 64: cifar10 is 32x32 (28x28 is padded), or average-pooled to 16 or 8"),
    (["--ch-mult", "1,2,2,2,2,2,2"], "--ch-mult [1, 2, 2, 2, 2, 2, 2]: image_size=32 is not divisible"),
    (["--categorical", "3"], "unrecognized arguments: --categorical 3"),   # beyond the paper: python -m beyond.train
    (["--eta-samples", "4"], "add --smd"), (["--dataset", "nowhere"], "neither cifar10"),
    (["--out-dir", "/proc/out"], "--out-dir /proc/out: cannot write in /proc"),   # found by writing, not os.access
    (["--out-dir", __file__], "is a file, not a folder"),
])
def test_bad_flags_refused_before_any_work(tmp_path, capsys, argv, says):
    err = refusal(capsys, ["--out-dir", str(tmp_path / "out"), *argv])
    assert says in err, err
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_a_short_chain_needs_no_sampling_flags():
    """--T 5 alone passes every check: the in-run grids sample min(100, T) steps."""
    parser = train.get_parser()
    check_args(parser.parse_args(["--T", "5"]), parser, train.UNet)


def test_resume_checks_stored_flags_and_finished_runs(tmp_path, cifar_dir, capsys):
    out = ["--out-dir", str(tmp_path / "out")]
    run(tmp_path / "out", "--dataset", "cifar10", "--data-dir", cifar_dir, "--max-steps", "2")
    err = refusal(capsys, [*out, "--resume"], tiny=False)   # --max-steps 2 is stored: the run is done
    assert "already at step 2 of --max-steps 2: pass a larger --max-steps" in err
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    ckpt["config"].update(sample_every=5, sample_steps=500)   # a stored value that cannot run
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    err = refusal(capsys, [*out, "--resume", "--max-steps", "4"], tiny=False)
    assert "--sample-steps 500 (stored in the checkpoint: pass --sample-steps to override it)" in err
    r = train.main([*out, "--resume", "--max-steps", "3", "--sample-steps", "10"])
    assert r["step"] == 3


def test_one_run_per_out_dir(tmp_path, cifar_dir):
    """A second run in a locked --out-dir is refused in one line; the lock dies with its process."""
    cmd = [sys.executable, "train.py", "--dataset", "cifar10", "--data-dir", cifar_dir, "--out-dir",
           str(tmp_path / "out"), *TINY, "--max-steps", "100000"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
    try:
        for line in first.stdout:
            if line.startswith("step 1/"):
                break
        second = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert "another training run is using --out-dir" in second.stderr
    finally:
        first.kill()
        first.wait()
    third = subprocess.run(cmd[:-1] + ["3", "--resume"], capture_output=True, text=True, env=ENV, cwd=ROOT,
                           timeout=120)
    assert "already at step" in third.stderr or third.returncode in (0, 2), third.stderr   # the lock is free again


def test_a_failed_save_keeps_the_run(tmp_path, cifar_dir, monkeypatch, capsys):
    """Checkpoint writes that fail (ENOSPC from the writer, at steps 2, 4 and 6, then twice more at
    the end) leave no partial file, say what happened and how much space a checkpoint needs, and
    lose no step: training goes on, the last checkpoint is retried until it is written, and its
    weights equal an undisturbed run's."""
    common = ["--dataset", "cifar10", "--data-dir", cifar_dir, "--ckpt-every", "2", "--max-steps", "6"]
    undisturbed = run(tmp_path / "a", *common)
    real_save, failures = torch.save, []

    def full_disk(obj, f, *a, **k):
        if obj.get("step", 0) >= 2 and len(failures) < 5:
            failures.append(obj["step"])
            f.write(b"x" * 1000)
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(run_module, "RETRY_S", 0.01)
    r = run(tmp_path / "b", *common)
    out = capsys.readouterr().out
    assert failures == [2, 4, 6, 6, 6] and r["step"] == 6
    assert out.count("could not write") == 5 and "No space left on device" in out and "MiB" in out
    assert "the checkpoint of step 1 is intact; training goes on and the next save tries again" in out   # the first
    # checkpoint is written at the first log step (TINY logs every step), then every --ckpt-every steps
    assert "trying again every 0.01 s" in out and "saved" in out.split("could not write")[-1]
    assert sorted(os.listdir(tmp_path / "b")) == [".lock", "ckpt.pt", "log.txt"]   # no partial file
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert b["step"] == 6 and all(torch.equal(a[k][n], b[k][n]) for k in ("model", "ema") for n in a[k])
    assert all(torch.equal(undisturbed["ema"].state_dict()[n], b["ema"][n]) for n in b["ema"])


def test_ctrl_c_while_a_save_waits_gives_up_and_names_what_works(tmp_path, cifar_dir, monkeypatch, capsys):
    """A checkpoint that cannot be written at the end is retried until a Ctrl-C gives up: exit 130,
    and the line names the checkpoint that is on disk and the command that continues it."""
    common = ["--dataset", "cifar10", "--data-dir", cifar_dir, "--ckpt-every", "2", "--max-steps", "4"]
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if obj.get("step") == 4:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(run_module, "RETRY_S", 0.01)
    monkeypatch.setattr(run_module.time, "sleep", lambda s: signal.raise_signal(signal.SIGINT))   # Ctrl-C while waiting
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "out", *common)
    out = capsys.readouterr().out
    assert e.value.code == 130
    assert f"steps 2-4 are lost; the checkpoint of step 2 is intact: python train.py --resume --out-dir " \
           f"{tmp_path / 'out'} continues it" in out
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 2


def test_the_log_holds_a_command_that_reruns_as_written(tmp_path, cifar_dir):
    """log.txt's second line quotes what needs it (an empty --attn-res, a folder with a space), so the
    line, run by a shell with --resume added, continues the run."""
    out = tmp_path / "my run"
    cmd = [sys.executable, "train.py", "--dataset", "cifar10", "--data-dir", cifar_dir, "--out-dir", str(out), *TINY,
           "--max-steps", "2"]
    assert subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120).returncode == 0
    line = (out / "log.txt").read_text().splitlines()[1]
    assert line.startswith("python train.py ") and "--attn-res ''" in line and f"'{out}'" in line
    again = line.replace("python", sys.executable, 1) + " --resume --max-steps 3"
    p = subprocess.run(["bash", "-c", again], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and "resumed at step 2" in p.stdout and "--resume: --max-steps 2 -> 3" in p.stdout, \
        p.stdout + p.stderr


if __name__ == "__main__":   # torchrun worker: train, then dump this rank's weights
    i = sys.argv.index("--dump")
    result = train.main(sys.argv[1:i] + sys.argv[i + 2:])
    torch.save({"model": result["model"].state_dict(), "ema": result["ema"].state_dict()},
               os.path.join(sys.argv[i + 1], f"rank{os.environ['RANK']}.pt"))
