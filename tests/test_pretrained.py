"""pretrained.py against diffusers' UNet2DModel: random weights saved as the hub saves them
(config.json, diffusion_pytorch_model.bin) load into unet.UNet, whose outputs then equal
diffusers'. Offline: downloads are faked."""

import os
import shutil
import urllib.error

import pytest
import torch

from machinery import pretrained
from unet import UNet, UNetConfig

from conftest import HUB_CONFIG, SMALL_CONFIG, diffusers_model, save_hub_files


def assert_same_outputs(theirs, config, state, image_size, channels):
    ours = UNet(config).eval()
    ours.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, channels, image_size, image_size, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    with torch.no_grad():
        want, got = theirs(x, t).sample, ours(x, t)
    diff = (want - got).abs().max().item()
    print(f"max abs diff {diff:.3g}, max abs output {want.abs().max().item():.3g}")
    assert diff < 1e-5 * want.abs().max().item()
    return diff


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    model = diffusers_model(HUB_CONFIG)
    return model, save_hub_files(str(tmp_path_factory.mktemp("ddpm-cifar10-32")), model, HUB_CONFIG)


def test_default_config_is_the_hubs():
    assert pretrained.DDPM_CIFAR10_CONFIG == {k: v for k, v in HUB_CONFIG.items() if k != "_diffusers_version"}


def test_cifar10_matches_diffusers(cifar):
    model, folder = cifar
    config, state, desc = pretrained.load(folder)
    assert "diffusion_pytorch_model.bin" in desc
    assert config == UNetConfig(image_size=32, channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                                attn_res=(16,), dropout=0.1)   # no dropout key: DDPM's 0.1
    config_bin, state_bin, _ = pretrained.load(os.path.join(folder, "diffusion_pytorch_model.bin"))
    assert config_bin == config and list(state_bin) == list(state)
    assert all(torch.equal(state[k], state_bin[k]) for k in state)
    assert_same_outputs(model, config, state, 32, 3)


def test_weights_file_without_config_assumes_cifar10(cifar, tmp_path):
    shutil.copy(os.path.join(cifar[1], "diffusion_pytorch_model.bin"), tmp_path)
    config, state, desc = pretrained.load(str(tmp_path / "diffusion_pytorch_model.bin"))
    assert "assumed google/ddpm-cifar10-32" in desc and config.ch_mult == (1, 2, 2, 2)
    assert set(state) == set(UNet(config).state_dict())


def test_small_config_matches_diffusers(tmp_path):
    model = diffusers_model(SMALL_CONFIG, seed=3)
    folder = save_hub_files(str(tmp_path), model, old_names=True)   # save_config: dropout 0.0
    config, state, desc = pretrained.load(folder)
    assert "diffusion_pytorch_model.bin" in desc
    assert config == UNetConfig(image_size=32, channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                attn_res=(32,), dropout=0.0)
    assert_same_outputs(model, config, state, 32, 1)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """torch's hub cache in tmp_path; returns google/ddpm-cifar10-32's folder there."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return str(tmp_path / "hub" / "checkpoints" / "google--ddpm-cifar10-32")


def test_hub_download_is_done_once(tmp_path, hub_cache, monkeypatch):
    model = diffusers_model(SMALL_CONFIG)
    served = save_hub_files(str(tmp_path / "served"), model)
    calls = []

    def fake_download(url, dst, *args, **kwargs):
        calls.append(url)
        name = url.rsplit("/", 1)[1]
        if not os.path.exists(os.path.join(served, name)):
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
        shutil.copy(os.path.join(served, name), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert pretrained.is_hub_id("google/ddpm-cifar10-32")
    config, state, desc = pretrained.load("google/ddpm-cifar10-32")
    url = "https://huggingface.co/google/ddpm-cifar10-32/resolve/main/"
    assert calls == [url + "config.json", url + "diffusion_pytorch_model.bin"]
    assert sorted(os.listdir(hub_cache)) == ["config.json", "diffusion_pytorch_model.bin"]
    assert config.channels == 1 and hub_cache in desc
    assert_same_outputs(model, config, state, 32, 1)
    pretrained.load("google/ddpm-cifar10-32")
    assert len(calls) == 2   # cached: nothing fetched again


def test_offline_error_says_what_to_fetch_and_where(hub_cache, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as e:
        pretrained.load("google/ddpm-cifar10-32")
    msg = str(e.value)
    for name in ("config.json", "diffusion_pytorch_model.bin"):
        assert f"https://huggingface.co/google/ddpm-cifar10-32/resolve/main/{name}" in msg
        assert os.path.join(hub_cache, name) in msg
    assert "\n" not in msg and "--ckpt" not in msg and "pass the path of a diffusion_pytorch_model.bin" in msg


@pytest.mark.parametrize("change, named", [
    (dict(flip_sin_to_cos=True), "flip_sin_to_cos"), (dict(freq_shift=0), "freq_shift"),
    (dict(attention_head_dim=8), "attention_head_dim"), (dict(downsample_padding=1), "downsample_padding"),
    (dict(norm_num_groups=16), "norm_num_groups"), (dict(out_channels=6), "out_channels"),
    (dict(norm_eps=1e-5), "norm_eps=1e-05"),
    (dict(time_embedding_type="fourier"), "time_embedding_type"),
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(block_out_channels=[128, 192, 256, 256]), "block_out_channels"),
    (dict(down_block_types=["CrossAttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]),
     "CrossAttnDownBlock2D"),
    (dict(up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]), "up_block_types"),
    (dict(_class_name="UNet2DConditionModel"), "UNet2DConditionModel"),
])
def test_unsupported_configs_are_named(change, named):
    with pytest.raises(ValueError, match=named):
        pretrained.unet_config(dict(HUB_CONFIG, **change))


def test_absent_keys_take_diffusers_defaults():
    # UNet2DModel's defaults flip_sin_to_cos=True and norm_eps=1e-5 are unsupported (unet.py: DDPM's 1e-6)
    for key, default in (("flip_sin_to_cos", "True"), ("norm_eps", "1e-05")):
        with pytest.raises(ValueError, match=f"{key}={default}"):
            pretrained.unet_config({k: v for k, v in HUB_CONFIG.items() if k != key})


def test_convert_checks_keys_and_shapes(cifar):
    state = pretrained.read_weights(os.path.join(cifar[1], "diffusion_pytorch_model.bin"))
    missing = {k: v for k, v in state.items() if k != "conv_out.bias"}
    with pytest.raises(ValueError, match=r"1 missing: out\.2\.bias"):
        pretrained.convert(missing, HUB_CONFIG)
    with pytest.raises(ValueError, match=r"unexpected: extra\.weight"):
        pretrained.convert({**state, "extra.weight": torch.zeros(1)}, HUB_CONFIG)
    with pytest.raises(ValueError, match=r"shape mismatch: conv_in\.weight"):
        pretrained.convert({**state, "conv_in.weight": torch.zeros(128, 3, 5, 5)}, HUB_CONFIG)


def test_corrupt_files_give_clear_errors(cifar, tmp_path):
    with open(os.path.join(cifar[1], "diffusion_pytorch_model.bin"), "rb") as f:
        head = f.read(1 << 20)   # the first MiB of a ~143 MB file
    path = str(tmp_path / "diffusion_pytorch_model.bin")
    with open(path, "wb") as f:
        f.write(head)
    with pytest.raises(RuntimeError, match="truncated or corrupt"):
        pretrained.read_weights(path)
    with pytest.raises(RuntimeError, match="truncated or corrupt"):
        pretrained.load(path)
    with pytest.raises(FileNotFoundError):
        pretrained.load(str(tmp_path / "nowhere" / "ckpt.pt"))


def test_safetensors_is_refused_clearly(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError) as e:
        pretrained.load(str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "use the diffusion_pytorch_model.bin of the same repository" in msg
    assert "convert" in msg


def test_is_hub_id(tmp_path):
    assert pretrained.is_hub_id("google/ddpm-cifar10-32") and pretrained.is_hub_id("owner/model.v2")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").write_text("")
    local = os.path.relpath(tmp_path / "a" / "b")
    assert not pretrained.is_hub_id(local)   # an existing path
    for s in ("ckpt.pt", "runs/ckpt.pt", "out/model.safetensors", "/abs/path", "a/b/c", "./x", None):
        assert not pretrained.is_hub_id(s), s
