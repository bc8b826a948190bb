"""sample.py on CPU: same seed same images, the outputs fid.py reads, eta-sensitivity for SMD
checkpoints, --eta-mode and --clip-x0, notes for flags that change nothing, the memory check,
and one-line refusals of bad flags, paths and checkpoints,
before any sampling."""

import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from machinery.checkpoint import load_checkpoint
from machinery import pretrained
from conftest import SMALL_CONFIG, diffusers_model, save_hub_files

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_same_seed_same_images(tiny_ckpts, sampler):
    model, diffusion, config = load_checkpoint(tiny_ckpts["smd"])
    assert config["smd"] and config["step"] == 3 and not model.training
    update = sample.step_update(sampler)
    gen = lambda seed: sample.generate(model, diffusion, 5, batch_size=4, steps=4, update=update, seed=seed,
                                       progress=False)
    a, b, c = gen(0), gen(0), gen(1)
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_cli_writes_grid_and_npz(tiny_ckpts, tmp_path, capsys):
    grid, npz = str(tmp_path / "g.png"), str(tmp_path / "s.npz")
    images = sample.main(["--ckpt", tiny_ckpts["smd"], "--steps", "3", "--n", "5", "--batch-size", "4",
                          "--grid", grid, "--npz", npz, "--eta-sensitivity", "8"])
    out = capsys.readouterr().out
    assert "img/s" in out and "ETA" in out and f"wrote {npz}" in out and f"wrote {grid}" in out
    assert re.search(r"eta-sensitivity \d\.\d{4} .*8 cifar10 images\); per t: 0: \d\.\d{3}, 11: ", out)
    assert np.array_equal(np.load(npz)["images"], images) and images.shape == (5, 32, 32, 3)
    assert Image.open(grid).size == (3 * 32, 2 * 32)   # 5 images in a 3-column grid
    again = sample.main(["--ckpt", tiny_ckpts["ddpm"], "--steps", "3", "--n", "2", "--grid", grid, "--no-ema",
                         "--force"])
    assert again.shape == (2, 32, 32, 3) and "eta-sensitivity" not in capsys.readouterr().out
    assert Image.open(grid).size == (2 * 32, 32)   # replaced, as --force asked


def refusal(capsys, argv):
    """The one line sample.py refuses argv with (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("sample.py: ") and err.count("\n") == 1, err
    return err


def test_clear_errors(tiny_ckpts, tmp_path, capsys):
    def fails(path, says, *extra):
        err = refusal(capsys, ["--ckpt", str(path), "--steps", "3", "--n", "1", "--grid", str(tmp_path / "g.png"),
                               *extra])
        assert re.search(says, err), err
    fails(tmp_path / "missing.pt", "no checkpoint at .*train one first \\(python train.py .*or pass --ckpt PATH")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(tiny_ckpts["ddpm"], "rb").read()[:5000])
    fails(truncated, "a torch zip, truncated or corrupt\\): delete it, or restore it")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    fails(tmp_path / "random.pt", "not a torch zip at all\\): pass the ckpt.pt train.py wrote")
    Image.new("RGB", (8, 8)).save(tmp_path / "some.png")   # a picture is not to be deleted
    err = refusal(capsys, ["--ckpt", str(tmp_path / "some.png"), "--grid", str(tmp_path / "g.png")])
    assert "not a torch zip" in err and "delete" not in err, err
    assert "weights_only" not in refusal(capsys, ["--ckpt", str(tmp_path / "random.pt"), "--grid", str(tmp_path / "g.png")])
    torch.save({"model": {}, "model_args": {"n_layer": 12}}, tmp_path / "gpt.pt")   # another project's ckpt
    fails(tmp_path / "gpt.pt", "not a train.py checkpoint")
    ckpt = torch.load(tiny_ckpts["ddpm"], weights_only=True)
    ckpt["model_config"]["ch"] = 64
    torch.save(ckpt, tmp_path / "other.pt")
    fails(tmp_path / "other.pt", "do not fit the network")
    fails(tiny_ckpts["ddpm"], r"--steps 200: this checkpoint's chain has only T=100", "--steps", "200")
    for flags, says in [(["--n", "0"], "--n: 0 is out of range"), (["--batch-size", "0"], "--batch-size: 0"),
                        (["--steps", "1"], "--steps: 1 is out of range"), (["--ddim-eta", "-1"], "--ddim-eta: -1"),
                        (["--eta-mode", "frozen"], "--eta-mode: invalid choice"), (["--eta", "zero"], "unrecognized arguments: --eta"),
                        (["--grid", str(tmp_path / "no" / "g.png")], "--grid .*: the folder .* does not exist"),
                        (["--npz", str(tmp_path)], "--npz .* is a folder")]:
        fails(tiny_ckpts["ddpm"], says, *flags)
    shutil.copy(tiny_ckpts["ddpm"], tmp_path / "ok.pt")   # and a good one still loads
    assert load_checkpoint(str(tmp_path / "ok.pt"))[2]["T"] == 100


def test_paths_are_checked_before_sampling(tiny_ckpts, tmp_path, capsys, monkeypatch):
    """A bad --npz path costs no sampling; a run folder means its ckpt.pt."""
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("sampled before checking --npz"))
    refusal(capsys, ["--ckpt", tiny_ckpts["ddpm"], "--npz", str(tmp_path / "missing" / "s.npz")])
    monkeypatch.undo()
    images = sample.main(["--ckpt", os.path.dirname(tiny_ckpts["ddpm"]), "--steps", "3", "--n", "2",
                          "--grid", str(tmp_path / "g.png")])
    assert images.shape == (2, 32, 32, 3)


def test_held_eta_makes_smd_ddim_deterministic(tiny_ckpts, tmp_path):
    """An SMD model whose latent matters: DDIM at --ddim-eta 0 differs between two seeds' etas
    only through eta; with --eta-mode zero (or fixed) the same x_T gives bit-identical images."""
    ckpt = torch.load(tiny_ckpts["smd"], weights_only=True)
    g = torch.Generator().manual_seed(0)
    for key in ("model", "ema"):   # a latent that changes the output
        for k, v in ckpt[key].items():
            if k.startswith("soft_mixture.f_phi"):
                v.copy_(torch.randn(v.shape, generator=g) * 0.5)
    torch.save(ckpt, tmp_path / "smd.pt")
    model, diffusion, _ = load_checkpoint(str(tmp_path / "smd.pt"))
    draw = lambda mode: sample.generate(model, diffusion, 4, steps=5, update=sample.step_update("ddim"),
                                        eta_mode=mode, progress=False)
    assert np.array_equal(draw("zero"), draw("zero")) and np.array_equal(draw("fixed"), draw("fixed"))
    assert not np.array_equal(draw("fresh"), draw("zero"))   # same x_T (seed 0): eta is the difference
    argv = ["--ckpt", str(tmp_path / "smd.pt"), "--sampler", "ddim", "--steps", "5", "--n", "4", "--grid",
            str(tmp_path / "g.png"), "--eta-sensitivity", "0", "--force"]
    assert np.array_equal(sample.main([*argv, "--eta-mode", "zero"]), draw("zero"))
    assert np.array_equal(sample.main([*argv, "--eta-mode", "fixed"]), draw("fixed"))
    clipped = sample.main([*argv, "--eta-mode", "fixed", "--clip-x0"])
    assert clipped.shape == (4, 32, 32, 3) and not np.array_equal(clipped, draw("fixed"))


def test_an_unused_latent_gives_the_same_images_in_every_eta_mode(tiny_ckpts, tmp_path):
    """With f_phi's last layer at zero the latent cannot matter: every --eta-mode sees the same x_T
    and step noise, so the three sample sets (DDPM's sampler) are equal, image for image; with a
    latent that matters they are not."""
    ckpt = torch.load(tiny_ckpts["smd"], weights_only=True)
    for key in ("model", "ema"):
        for k in ("soft_mixture.f_phi.4.weight", "soft_mixture.f_phi.4.bias"):
            ckpt[key][k].zero_()
    torch.save(ckpt, tmp_path / "unused.pt")
    model, diffusion, _ = load_checkpoint(str(tmp_path / "unused.pt"))
    draw = lambda mode: sample.generate(model, diffusion, 3, steps=5, eta_mode=mode, progress=False)
    fresh = draw("fresh")
    assert np.array_equal(fresh, draw("zero")) and np.array_equal(fresh, draw("fixed"))
    with torch.no_grad():
        for p in model.soft_mixture.f_phi.parameters():
            p.normal_(0, 0.5)
    assert not np.array_equal(draw("fresh"), draw("zero"))


def test_flags_that_change_nothing_say_so(tiny_ckpts, tmp_path, capsys):
    g = ["--grid", str(tmp_path / "g.png"), "--force", "--n", "1", "--steps", "2"]
    sample.main(["--ckpt", tiny_ckpts["ddpm"], *g, "--eta-sensitivity", "4", "--eta-mode", "zero"])
    out = capsys.readouterr().out
    assert "note: --eta-sensitivity has no effect: " in out and "note: --eta-mode has no effect: " in out
    assert "eta " not in out.splitlines()[0]   # the header names no eta mode for a DDPM model
    sample.main(["--ckpt", tiny_ckpts["smd"], *g, "--sampler", "ddim", "--var", "small"])
    assert "note: --var has no effect: DDIM's noise is --ddim-eta's" in capsys.readouterr().out
    sample.main(["--ckpt", tiny_ckpts["smd"], *g, "--ddim-eta", "1"])
    assert "note: --ddim-eta has no effect" in capsys.readouterr().out
    sample.main(["--ckpt", tiny_ckpts["categorical"], *g, "--var", "small"])   # learned variances
    out = capsys.readouterr().out
    assert "note: --var has no effect: the model learns sigma_t" in out and "sigma^2 learned" in out.splitlines()[0]
    sample.main(["--ckpt", tiny_ckpts["smd"], *g])
    assert "note:" not in capsys.readouterr().out


def test_an_n_beyond_memory_is_refused_before_sampling(tiny_ckpts, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "batches", lambda *a, **k: pytest.fail("sampled before the memory check"))
    err = refusal(capsys, ["--ckpt", tiny_ckpts["ddpm"], "--n", str(10**8), "--npz", str(tmp_path / "s.npz")])
    assert re.search(r"--n 100000000: its images take 286\.1 GiB \(32x32x3 uint8 each\), this machine has [\d.]+ "
                     r"GiB available: use --n \d+ or less per run", err), err


def test_ctrl_c_keeps_the_images_made(tiny_ckpts, tmp_path, capsys, monkeypatch):
    """A Ctrl-C after the first batch writes that batch to the .npz, says so, and exits 130."""
    real = sample.batches

    def two_then_ctrl_c(*a, **k):
        for i, item in enumerate(real(*a, **k)):
            if i == 1:
                raise KeyboardInterrupt
            yield item
    monkeypatch.setattr(sample, "batches", two_then_ctrl_c)
    npz = tmp_path / "s.npz"
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", tiny_ckpts["ddpm"], "--n", "5", "--batch-size", "2", "--steps", "2", "--npz", str(npz)])
    out, err = capsys.readouterr()
    assert e.value.code == 130 and "(interrupted: 2 of 5 images)" in out and err.strip().startswith("sample.py: interrupted")
    assert np.load(npz)["images"].shape == (2, 32, 32, 3)


def test_sample_from_published_weights(tmp_path, monkeypatch, capsys):
    """--ckpt takes diffusers' DDPM files (here random weights in a small config) and samples
    on DDPM's chain; a hub id that cannot be downloaded says which files to fetch, and where."""
    small = dict(SMALL_CONFIG, in_channels=3, out_channels=3)
    folder = save_hub_files(str(tmp_path / "ddpm"), diffusers_model(small), small)
    images = sample.main(["--ckpt", folder, "--steps", "3", "--n", "2", "--grid", str(tmp_path / "g.png")])
    assert images.shape == (2, 32, 32, 3) and "published weights" in capsys.readouterr().out

    def offline(url, dst, *a, **k):
        raise OSError("Name or service not known")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", pretrained.DEFAULT_MODEL, "--n", "1", "--grid", str(tmp_path / "g2.png")])
    assert re.search(r"(?s)could not download google/ddpm-cifar10-32.*"
                     r"https://huggingface.co/google/ddpm-cifar10-32/resolve/main/config.json"
                     r".*hub/checkpoints/google--ddpm-cifar10-32/diffusion_pytorch_model.bin", capsys.readouterr().err)


# ----------------------------------------------------------------------------- outputs: checked first, never lost


@pytest.mark.parametrize("name, says", [
    ("samples", "--grid .*samples: the format comes from the extension; end the name in .png or .jpg or .jpeg"),
    ("g.txt", "--grid .*g.txt: the format comes from the extension"),
    ("keep.png", "--grid .*keep.png exists: pass --force to replace it, or choose another name"),
])
def test_grid_refused_before_sampling(tiny_ckpts, tmp_path, capsys, monkeypatch, name, says):
    """A grid path whose format or existence would fail after the sampling fails before it, and
    the file that exists (here a text file named keep.png) is untouched."""
    (tmp_path / "keep.png").write_text("my notes")
    monkeypatch.setattr(sample, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before checking --grid"))
    err = refusal(capsys, ["--ckpt", tiny_ckpts["ddpm"], "--grid", str(tmp_path / name)])
    assert re.search(says, err), err
    assert (tmp_path / "keep.png").read_text() == "my notes"


def test_npz_refused_before_sampling_unless_forced(tiny_ckpts, tmp_path, capsys, monkeypatch):
    np.savez(tmp_path / "s.npz", images=np.zeros((1, 2, 2, 3), np.uint8))
    monkeypatch.setattr(sample, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before checking --npz"))
    err = refusal(capsys, ["--ckpt", tiny_ckpts["ddpm"], "--npz", str(tmp_path / "s.npz")])
    assert "s.npz exists: pass --force" in err
    err = refusal(capsys, ["--ckpt", tiny_ckpts["ddpm"], "--npz", str(tmp_path / "s.png")])
    assert "end the name in .npz" in err


def test_unwritable_folder_is_found_by_writing_not_by_os_access(tiny_ckpts, capsys, monkeypatch):
    """/proc passes os.access for root, but no file can be made there."""
    monkeypatch.setattr(sample, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before checking --grid"))
    err = refusal(capsys, ["--ckpt", tiny_ckpts["ddpm"], "--grid", "/proc/g.png"])
    assert re.search(r"--grid /proc/g.png: cannot write in /proc \(.+\); choose another path", err), err


def test_a_failed_grid_keeps_the_npz(tiny_ckpts, tmp_path, capsys, monkeypatch):
    """The .npz is written first; a grid that fails after the sampling is reported in one line,
    exit status 1, and the .npz is there."""
    def full_disk(images, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sample, "save_grid", full_disk)
    npz = tmp_path / "s.npz"
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", tiny_ckpts["ddpm"], "--steps", "3", "--n", "2", "--npz", str(npz),
                     "--grid", str(tmp_path / "g.png")])
    out, err = capsys.readouterr()
    assert e.value.code == 1 and np.load(npz)["images"].shape == (2, 32, 32, 3) and f"wrote {npz}" in out
    assert "could not write" in err and "No space left on device" in err and not (tmp_path / "g.png").exists()


def test_ctrl_c_is_one_line_and_leaves_no_file(tiny_ckpts, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(sample, "batches", interrupted)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", tiny_ckpts["ddpm"], "--n", "2", "--npz", str(tmp_path / "s.npz")])
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.strip().startswith("sample.py: interrupted") and err.strip().count("\n") == 0
    assert os.listdir(tmp_path) == []


def test_progress_inside_the_chain_and_no_ddpm_variance_for_ddim(tiny_ckpts, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sample.Progress, "EVERY", -1.0)   # a line at every step
    sample.main(["--ckpt", tiny_ckpts["ddpm"], "--steps", "3", "--n", "2", "--sampler", "ddim",
                 "--grid", str(tmp_path / "g.png")])
    out = capsys.readouterr().out
    assert re.search(r"images 0-2/2: step 2/3 \| .* img/s \| ETA ", out), out
    assert "sigma^2" not in out.splitlines()[0] and "DDIM" in out.splitlines()[0]


def test_a_padded_last_batch_keeps_the_count_and_the_full_batches(tiny_ckpts):
    """pad=True (sample.py with --compile) runs the last batch at full size: 5 images still,
    and the first, full batch is the unpadded run's."""
    model, diffusion, _ = load_checkpoint(tiny_ckpts["ddpm"])
    plain = sample.generate(model, diffusion, 5, batch_size=4, steps=3, progress=False)
    padded = sample.generate(model, diffusion, 5, batch_size=4, steps=3, progress=False, pad=True)
    assert padded.shape == (5, 32, 32, 3) and np.array_equal(plain[:4], padded[:4])
