"""The networks: shapes, tile multiples, and locality (what makes tiled = whole-image)."""

import pytest
import torch

from napari_lcm_stain.models import (
    VAE,
    LatentUNet,
    PatchDiscriminator,
    Pix2PixGenerator,
    build,
    count_parameters,
)


def test_shapes_and_multiples():
    torch.manual_seed(0)
    vae, unet, gen = VAE(4, 8, 8), LatentUNet(4, 4, (8, 16, 16)), Pix2PixGenerator(8, 4)
    x = torch.randn(2, 1, 64, 96)
    rec, mean, logvar = vae(x)
    assert rec.shape == x.shape and mean.shape == (2, 4, 16, 24) and logvar.shape == mean.shape
    assert unet.multiple == 16 and gen.multiple == 16
    v = unet(torch.randn(2, 4, 16, 24), torch.tensor([999, 10]), x)
    assert v.shape == (2, 4, 16, 24)
    y = gen(x)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert PatchDiscriminator(8)(x, y).shape[1] == 1


def test_factor8_latent_shapes_and_errors():
    """The packaged layout: 8x latent, one extra pixel-shuffle step in the decoder."""
    vae, unet = VAE(8, 16, 16, factor=8), LatentUNet(8, 8, (8, 16, 16))
    x = torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        rec, mean, _ = vae(x)
        assert rec.shape == x.shape and mean.shape == (1, 8, 8, 12)
        assert unet(mean, torch.tensor([999]), x).shape == mean.shape
    assert unet.multiple == 32 and vae.factor == 8
    assert hasattr(vae.decoder, "up0") and not hasattr(VAE(4, 8, 8).decoder, "up0")
    with pytest.raises(ValueError, match="factor must be 4 or 8"):
        VAE(4, 8, 8, factor=2)


def test_scalar_timestep_broadcasts():
    unet = LatentUNet(4, 4, (8, 16))
    z, x = torch.randn(3, 4, 8, 8), torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        a = unet(z, torch.tensor(500), x)
        b = unet(z, torch.full((3,), 500), x)
    assert torch.equal(a, b)


@torch.no_grad()
def test_no_spatial_pooling_norm_output_is_local():
    """Changing a far-away input pixel must not change the output: no GroupNorm/attention."""
    torch.manual_seed(1)
    unet, dec = LatentUNet(4, 4, (8, 16, 16)).eval(), VAE(4, 8, 8).decoder.eval()
    for p in list(unet.parameters()) + list(dec.parameters()):
        p.normal_(0, 0.1)
    z, x = torch.randn(1, 4, 64, 64), torch.randn(1, 1, 256, 256)
    x2 = x.clone()
    x2[..., -1, -1] += 100.0
    out1, out2 = unet(z, torch.tensor([999]), x), unet(z, torch.tensor([999]), x2)
    assert torch.equal(out1[..., :16, :16], out2[..., :16, :16])
    assert not torch.equal(out1, out2)
    z2 = z.clone()
    z2[..., -1, -1] += 100.0
    assert torch.equal(dec(z)[..., :32, :32], dec(z2)[..., :32, :32])


def test_build_from_config_and_unknown_arch():
    m = build({"class": "LatentUNet", "kwargs": {"channels": [8, 16], "latent_channels": 4}})
    assert isinstance(m, LatentUNet) and m.channels == (8, 16)
    assert count_parameters(m) > 0
    with pytest.raises(ValueError, match="unknown architecture"):
        build({"class": "Transformer9000"})


@torch.no_grad()
def test_conditioning_encoder_sees_the_qobm_and_stays_local():
    """`cond_channels`: a full-resolution encoder of the qOBM joins the unshuffled pixels; the
    output keeps its shape, depends on the encoder, and stays local (tiled = whole image)."""
    torch.manual_seed(2)
    unet = LatentUNet(4, 8, (8, 16), cond_channels=(4, 8, 8, 16)).eval()
    assert unet.cond_encoder is not None and unet.stem.in_channels == 4 + 64 + 16
    z, x = torch.randn(1, 4, 16, 16), torch.randn(1, 1, 128, 128)
    t = torch.tensor([999])
    out = unet(z, t, x)
    assert out.shape == z.shape
    unet.cond_encoder[0].weight.mul_(2.0)  # the encoder's path reaches the output
    assert not torch.equal(unet(z, t, x), out)
    x2 = x.clone()
    x2[..., -1, -1] += 100.0
    far = unet(z, t, x2)
    assert torch.equal(far[..., :4, :4], unet(z, t, x)[..., :4, :4]) and not torch.equal(far, out)
    with pytest.raises(ValueError, match="log2\\(factor\\) \\+ 1 = 4 entries"):
        LatentUNet(4, 8, (8, 16), cond_channels=(4, 8))
    m = build({"class": "LatentUNet", "kwargs": {"channels": [8, 16], "factor": 4,
                                                 "cond_channels": [4, 8, 8]}})  # fmt: skip
    assert m.cond_channels == (4, 8, 8)
    assert LatentUNet(4, 4, (8, 16)).cond_encoder is None  # the default: the network before it


def test_texture_decoder_adds_amplitude_times_noise_to_its_mean():
    """A texture decoder returns its mean without noise, mean + amplitude x noise with it, and
    a deterministic decoder's weights load into it with the texture head at its start value."""
    torch.manual_seed(0)
    plain = VAE(4, 8, 8, 8, 8, 8, False)
    tex = VAE(4, 8, 8, 8, 8, 8, False, dec_texture=True)
    assert not plain.decoder.texture and tex.decoder.texture
    state = plain.decoder.state_dict()
    with pytest.raises(RuntimeError):
        tex.decoder.load_state_dict(state)  # the head is missing ...
    tex.decoder.load_state_dict(tex.decoder.with_texture_defaults(state))  # ... and filled in
    assert plain.decoder.with_texture_defaults(state) is state
    z = torch.randn(2, 4, 4, 4)
    eps = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        mean, amp = tex.decoder(z, parts=True)
        assert torch.equal(mean, plain.decode(z))  # same weights: same mean
        assert torch.equal(tex.decode(z), mean)  # no noise given: the mean
        assert torch.allclose(tex.decode(z, eps), mean + amp * eps)
        assert torch.allclose(amp, torch.full_like(amp, 0.02))  # the start amplitude
        assert plain.decoder(z, parts=True)[1] is None
        assert torch.equal(plain.decode(z, eps), mean)  # a plain decoder ignores the noise
