"""The U-Net: DDPM's size, SDPA attention, where SMD's soft mixture enters and what it modulates,
a golden output, bf16 autocast (CPU)."""

import os

import pytest
import torch

import smd
import unet
from unet import UNet, UNetConfig

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_smd_unet.pt")

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_res=(16,), dropout=0.0)


def tiny(**kw):
    return UNet(UNetConfig(**{**TINY, **kw}))


def randomize(model, seed=0):
    """DDPM zero-initialises the last conv of every block: give every weight a value so
    that equalities below are not 0 == 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_cifar10_unet_has_ddpm_parameter_count():
    assert sum(p.numel() for p in UNet().parameters()) == 35_746_307   # DDPM's CIFAR-10 model


def test_timestep_embedding_matches_diffusers():
    emb = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0, 1, 17, 500, 999])
    ref = emb.get_timestep_embedding(t, 128, flip_sin_to_cos=False, downscale_freq_shift=1)
    torch.testing.assert_close(smd.timestep_embedding(t, 128), ref)


def test_attention_equals_softmax_formula():
    attn = randomize(unet.Attention(32))
    x = torch.randn(2, 32, 4, 4)
    h = attn.norm(x)
    q, k, v = attn.qkv(h).chunk(3, dim=1)
    q, k, v = (a.flatten(2) for a in (q, k, v))                   # (B, C, HW)
    w = torch.softmax(q.transpose(1, 2) @ k / 32**0.5, dim=-1)    # (B, HW, HW)
    ref = x + attn.proj((v @ w.transpose(1, 2)).view(2, 32, 4, 4))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("image_size,channels", [(32, 1), (32, 3), (64, 3)])
def test_shapes(image_size, channels):
    m = tiny(image_size=image_size, channels=channels)
    x = torch.randn(2, channels, image_size, image_size)
    assert m(x, torch.tensor([0, 999])).shape == x.shape


def test_bad_input_and_config_raise():
    with pytest.raises(ValueError, match="this UNet takes"):
        tiny()(torch.randn(1, 3, 28, 28), torch.tensor([0]))
    with pytest.raises(ValueError, match="image_size=48"):
        UNetConfig(image_size=48)
    with pytest.raises(ValueError, match="not divisible"):
        UNetConfig(image_size=34, ch_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="norm_groups=0"):
        UNetConfig(norm_groups=0)


def test_norm_groups_sets_every_groupnorm_and_is_used():
    """norm_groups = G gives each GroupNorm gcd(G, channels) groups (DDPM's 32 by default), in
    forward too: the same weights under 4 groups compute what F.group_norm with 4 groups does."""
    groups = lambda m: {(g.num_channels, g.num_groups) for g in m.modules() if isinstance(g, torch.nn.GroupNorm)}
    assert groups(tiny()) == {(32, 32), (64, 32), (96, 32), (128, 32)}
    assert groups(tiny(ch=30)) == {(30, 2), (60, 4), (90, 2), (120, 8)}
    four = randomize(tiny(norm_groups=4)).eval()
    assert groups(four) == {(32, 4), (64, 4), (96, 4), (128, 4)}
    x = torch.randn(2, 32, 8, 8)
    g = four.down[0].norm1
    torch.testing.assert_close(g(x), torch.nn.functional.group_norm(x, 4, g.weight, g.bias, 1e-6))
    default = tiny().eval()
    default.load_state_dict(four.state_dict())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    with torch.no_grad():
        assert (default(x, t) - four(x, t)).abs().max() > 1e-3


def test_untrained_smd_equals_vanilla_then_depends_on_eta():
    torch.manual_seed(0)
    vanilla = randomize(tiny()).eval()
    model = tiny(smd=True, latent_dim=8).eval()
    missing, unexpected = model.load_state_dict(vanilla.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("soft_mixture.") for k in missing)
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([5, 300, 900])
    eta1, eta2 = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        ref = vanilla(x, t)
        torch.testing.assert_close(model(x, t, eta1), ref)     # f_phi's last layer is zero: theta_hat = theta
        torch.testing.assert_close(model(x, t, eta2), ref)
        torch.nn.init.normal_(model.soft_mixture.f_phi[-1].weight, std=0.5)
        a, b = model(x, t, eta1), model(x, t, eta2)
    scale = ref.abs().max()
    assert (a - b).abs().max() > 1e-4 * scale                # now the output depends on eta
    assert (a - ref).abs().max() > 1e-2 * scale


def test_smd_modulates_middle_and_decoder_blocks():
    model = tiny(smd=True)
    blocks = [m for m in [*model.mid, *model.up] if isinstance(m, unet.ResBlock)]
    assert model.soft_mixture.block_channels == [b.conv2.out_channels for b in blocks]
    assert [[*model.mid, *model.up][i] for i in model.modulated] == blocks
    assert model.latent_dim == 64 and tiny().latent_dim == 0


def test_smd_needs_eta_from_its_caller():
    """Diffusion owns eta: an SMD U-Net never draws its own, and a vanilla one ignores it."""
    model = randomize(tiny(smd=True, latent_dim=8)).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 20])
    with pytest.raises(ValueError, match="needs eta"):
        model(x, t)
    eta = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, eta), model(x, t, eta))
        vanilla = randomize(tiny()).eval()
        torch.testing.assert_close(vanilla(x, t, eta), vanilla(x, t))


def test_downsampling_pads_like_tensorflow_same():
    """DDPM's stride-2 conv ('SAME' in TF) pads one row and column at the bottom/right only."""
    down = unet.Downsample(4)
    x = torch.randn(1, 4, 8, 8)
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    torch.testing.assert_close(down(x), ref)
    assert all(m.eps == 1e-6 for m in tiny().modules() if isinstance(m, torch.nn.GroupNorm))


def test_soft_mixture_sees_the_pooled_bottleneck_and_modulates_norm2():
    """UNet.forward feeds g_xi the spatial mean of the encoder's last activations (with eta and the
    time embedding), and each modulated ResBlock applies its (scale, shift) right after norm2."""
    model = randomize(tiny(smd=True, latent_dim=8)).eval()
    x, t, eta = torch.randn(2, 3, 32, 32), torch.tensor([3, 700]), torch.randn(2, 8)
    seen, norm2_out, block_in = {}, [], []
    model.soft_mixture.register_forward_hook(lambda m, a, out: seen.update(args=a, mods=out))
    model.down[-1].register_forward_hook(lambda m, a, out: seen.update(bottleneck=out))
    block = model.mid[1]
    block.norm2.register_forward_hook(lambda m, a, out: norm2_out.append(out))
    block.conv2.register_forward_hook(lambda m, a, out: block_in.append(a[0]))
    with torch.no_grad():
        model(x, t, eta)
    e, feats, temb = seen["args"]
    assert torch.equal(e, eta) and torch.allclose(feats, seen["bottleneck"].mean((2, 3)), atol=1e-6)
    torch.testing.assert_close(temb, model.temb(smd.timestep_embedding(t, 32)))
    scale, shift = seen["mods"][model.modulated.index(1)]                       # mid[1] is layer 1 of mid + up
    h = norm2_out[0] * (1 + scale[:, :, None, None]) + shift[:, :, None, None]  # then SiLU, dropout (off), conv2
    torch.testing.assert_close(block_in[0], torch.nn.functional.silu(h))


def make_golden():
    """A small SMD U-Net with every weight random (f_phi too), its inputs and its outputs:
    written once by this function, compared by the test below."""
    torch.manual_seed(0)
    cfg = dict(image_size=8, channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_res=(4,), dropout=0.0,
               smd=True, latent_dim=4)
    model = randomize(UNet(UNetConfig(**cfg))).eval()
    for p in model.soft_mixture.parameters():   # a latent and a modulation that matter
        torch.nn.init.normal_(p, std=0.5)
    x, t, eta = torch.randn(3, 1, 8, 8), torch.tensor([0, 41, 999]), torch.randn(3, 4)
    with torch.no_grad():
        out = model(x, t, eta)
    torch.save({"config": cfg, "state": model.state_dict(), "x": x, "t": t, "eta": eta, "out": out}, GOLDEN)


def test_golden_output():
    """The output of a fixed SMD U-Net (tests/data/golden_smd_unet.pt, written by make_golden)
    stays what it was: any change to the U-Net, g_xi, f_phi or modulate shows here."""
    g = torch.load(GOLDEN, weights_only=True)
    model = UNet(UNetConfig(**g["config"])).eval()
    model.load_state_dict(g["state"])
    with torch.no_grad():
        torch.testing.assert_close(model(g["x"], g["t"], g["eta"]), g["out"], atol=1e-5, rtol=1e-5)
        other = model(g["x"], g["t"], torch.zeros_like(g["eta"]))
    assert (other - g["out"]).abs().max() > 1e-2 * g["out"].abs().max()   # eta matters in this model


@pytest.mark.parametrize("smd", [False, True])
def test_bf16_autocast_channels_last_forward_is_finite(smd):
    model = randomize(tiny(smd=smd, latent_dim=8)).to(memory_format=torch.channels_last)
    x, eta = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last), torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.tensor([1, 999]), eta)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        ref = model.float()(x, torch.tensor([1, 999]), eta)
    assert (ref - out.float()).abs().max() < 0.05 * ref.abs().max()   # bf16 is close to fp32
