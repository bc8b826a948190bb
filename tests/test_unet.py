"""The U-Net: DDPM's size, SDPA attention, SMD modulation, bf16 autocast (CPU)."""

import pytest
import torch

import unet
from unet import UNet, UNetConfig

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
    torch.testing.assert_close(unet.timestep_embedding(t, 128), ref)


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


def test_mixture_heads():
    """--mixture K: K predictions from the last conv, K logits (and K variance mixes) from the pooled
    bottleneck; pi starts uniform and the K predictions start different from each other."""
    m = tiny(components=4, learned_var=True)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 500])
    out, logits, v = m(x, t)
    assert out.shape == (2, 4, 3, 32, 32) and logits.shape == v.shape == (2, 4)
    assert torch.equal(logits, torch.zeros(2, 4)) and (out[:, 0] - out[:, 1]).abs().mean() > 1e-3
    assert tiny(components=4)(x, t)[2] is None
    with pytest.raises(ValueError, match="smd"):
        UNetConfig(smd=True, components=4)


def test_bad_input_and_config_raise():
    with pytest.raises(ValueError, match="this UNet takes"):
        tiny()(torch.randn(1, 3, 28, 28), torch.tensor([0]))
    with pytest.raises(ValueError, match="image_size=48"):
        UNetConfig(image_size=48)
    with pytest.raises(ValueError, match="not divisible"):
        UNetConfig(image_size=34, ch_mult=(1, 2, 2))


def test_untrained_smd_equals_vanilla_then_depends_on_eta():
    torch.manual_seed(0)
    vanilla = randomize(tiny()).eval()
    model = tiny(smd=True, latent_dim=8).eval()
    missing, unexpected = model.load_state_dict(vanilla.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("mixture.") for k in missing)
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([5, 300, 900])
    eta1, eta2 = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        ref = vanilla(x, t)
        torch.testing.assert_close(model(x, t, eta1), ref)     # f_phi's last layer is zero: theta_hat = theta
        torch.testing.assert_close(model(x, t, eta2), ref)
        torch.nn.init.normal_(model.mixture.f_phi[-1].weight, std=0.5)
        a, b = model(x, t, eta1), model(x, t, eta2)
    scale = ref.abs().max()
    assert (a - b).abs().max() > 1e-4 * scale                # now the output depends on eta
    assert (a - ref).abs().max() > 1e-2 * scale


def test_smd_modulates_middle_and_decoder_blocks():
    model = tiny(smd=True)
    blocks = [m for m in [*model.mid, *model.up] if isinstance(m, unet.ResBlock)]
    assert model.mixture.block_channels == [b.conv2.out_channels for b in blocks]
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
    """DDPM's stride-2 conv ('SAME' in TF) pads one row and column at the bottom/right only;
    tf_downsample=False (checkpoints from before the field) pads every side."""
    torch.manual_seed(0)
    tf, sym = unet.Downsample(4, tf_pad=True), unet.Downsample(4, tf_pad=False)
    sym.load_state_dict(tf.state_dict())
    x = torch.randn(1, 4, 8, 8)
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), tf.conv.weight, tf.conv.bias, stride=2)
    torch.testing.assert_close(tf(x), ref)
    assert tf(x).shape == sym(x).shape == (1, 4, 4, 4) and not torch.allclose(tf(x), sym(x))
    assert all(m.eps == 1e-6 for m in tiny().modules() if isinstance(m, torch.nn.GroupNorm))


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
