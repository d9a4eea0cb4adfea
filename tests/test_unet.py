"""Tests for improved_diffusion.unet and improved_diffusion.nn."""

import math

import pytest
import torch

from improved_diffusion.nn import (
    GroupNorm32,
    checkpoint,
    mean_flat,
    normalization,
    timestep_embedding,
    update_ema,
    zero_module,
)
from improved_diffusion.unet import AttentionBlock, UNetModel, _tile_sizes


def _unet(**overrides):
    torch.manual_seed(0)
    kw = dict(
        in_channels=2,
        model_channels=16,
        out_channels=4,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2, 2),
        num_heads=2,
        use_scale_shift_norm=True,
    )
    kw.update(overrides)
    return UNetModel(**kw)


def _randomize(model):
    # Zero-initialized output layers would make every output 0; randomize to see real behaviour.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("shape", [(1, 2, 37, 23), (2, 2, 16, 16), (1, 2, 3, 5), (1, 2, 40, 9)])
def test_output_shape_equals_input_with_attention(shape):
    model = _randomize(_unet()).eval()
    out = model(torch.randn(shape), torch.full((shape[0],), 7))
    assert out.shape == (shape[0], 4, *shape[2:])
    assert torch.isfinite(out).all()


def test_padding_leaves_multiples_untouched_and_crops_centre():
    model = _randomize(_unet(attention_resolutions=())).eval()
    assert model.size_multiple == 4
    assert model._pad_amounts((37, 23)) == ((1, 2), (0, 1))
    assert model._pad_amounts((16, 8)) == ((0, 0), (0, 0))
    # The output on the cropped region comes from the centred image: reflect padding equals running the
    # model on an explicitly reflect-padded input and cropping.
    x = torch.randn(1, 2, 14, 15)
    t = torch.tensor([3])
    padded = torch.nn.functional.pad(x, (0, 1, 1, 1), mode="reflect")
    torch.testing.assert_close(model(x, t), model(padded, t)[:, :, 1:15, 0:15])


def test_class_conditional_and_errors():
    model = _unet(num_classes=3)
    x = torch.randn(2, 2, 8, 8)
    assert model(x, torch.tensor([1, 2]), y=torch.tensor([0, 2])).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="expected x of shape"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.tensor([1, 2, 3]), y=torch.tensor([0, 1]))
    # A scalar timestep is broadcast to the batch.
    assert model(x, torch.tensor(4), y=torch.tensor([0, 1])).shape == (2, 4, 8, 8)


def test_zero_init_output_and_channel_doubling():
    model = _unet()
    with torch.no_grad():
        out = model(torch.randn(1, 2, 8, 8), torch.tensor([0]))
    assert out.shape == (1, 4, 8, 8) and float(out.abs().max()) == 0.0  # zero_module on the last conv


def test_gradient_checkpointing_matches():
    x = torch.randn(2, 2, 12, 12)
    t = torch.tensor([1, 9])
    grads = []
    for use_ckpt in (False, True):
        model = _randomize(_unet(use_checkpoint=use_ckpt, dropout=0.0))
        model(x, t).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_attention_matches_naive_upstream_layout():
    torch.manual_seed(0)
    block = AttentionBlock(8, num_heads=2)
    with torch.no_grad():
        block.proj_out.weight.normal_()
    x = torch.randn(2, 8, 3, 5)
    out = block(x)

    # Naive reference: qkv channels grouped per head as (q, k, v), softmax(q^T k / sqrt(ch)).
    b, c, heads, ch = 2, 8, 2, 4
    qkv = block.qkv(block.norm(x.reshape(b, c, -1)))
    q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    ref = (x.reshape(b, c, -1) + block.proj_out(a)).reshape(x.shape)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_tile_sizes():
    assert _tile_sizes(80, 16) == [16] * 5
    assert _tile_sizes(50, 16) == [13, 13, 12, 12]
    assert _tile_sizes(16, 16) == [16]
    assert _tile_sizes(5, 16) == [5]


def test_tiled_attention_matches_masked_reference():
    torch.manual_seed(0)
    block = AttentionBlock(8, num_heads=2, max_tokens=20, window=4)
    with torch.no_grad():
        block.proj_out.weight.normal_()
    x = torch.randn(2, 8, 7, 9)  # 63 > 20 positions: tiles of rows (4, 3) x columns (3, 3, 3)
    out = block(x)

    # Reference: global qkv, then softmax over the positions of the same tile only (a block mask).
    b, c, heads, ch = 2, 8, 2, 4
    qkv = block.qkv(block.norm(x.reshape(b, c, -1)))
    q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    row_tile = torch.repeat_interleave(torch.arange(2), torch.tensor([4, 3]))
    col_tile = torch.repeat_interleave(torch.arange(3), torch.tensor([3, 3, 3]))
    tile = (row_tile[:, None] * 3 + col_tile[None, :]).flatten()
    logits = torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch)
    logits = logits.masked_fill(tile[:, None] != tile[None, :], float("-inf"))
    a = torch.einsum("bts,bcs->bct", torch.softmax(logits, dim=-1), v).reshape(b, c, -1)
    ref = (x.reshape(b, c, -1) + block.proj_out(a)).reshape(x.shape)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Within the budget the block attends globally, as without one.
    plain = AttentionBlock(8, num_heads=2)
    plain.load_state_dict(block.state_dict())
    small = torch.randn(2, 8, 4, 5)
    torch.testing.assert_close(block(small), plain(small), rtol=0, atol=0)
    assert not torch.allclose(block(x), plain(x), atol=1e-3)


def test_attention_token_budget_leaves_nominal_size_unchanged():
    plain = _randomize(_unet()).eval()  # attention at ds 2: nominal side 16 // 2 = 8
    budget = _unet(attention_token_budget=4.0, image_size=16).eval()
    budget.load_state_dict(plain.state_dict(), strict=True)
    assert plain.state_dict().keys() == budget.state_dict().keys()
    t = torch.tensor([5])
    with torch.no_grad():
        for side in (16, 32):  # 8x8 and 16x16 attention maps: within 4 x 64 tokens
            x = torch.randn(1, 2, side, side)
            torch.testing.assert_close(budget(x, t), plain(x, t), rtol=0, atol=0)
        x = torch.randn(1, 2, 48, 40)  # 24 x 20 = 480 > 256 tokens: tiles of at most 8 x 8
        assert not torch.allclose(budget(x, t), plain(x, t), atol=1e-4)
    with pytest.raises(ValueError, match="attention_token_budget"):
        _unet(attention_token_budget=4.0)  # no image_size
    with pytest.raises(ValueError, match="attention_token_budget"):
        _unet(dims=3, attention_token_budget=4.0, image_size=16)


def test_one_and_three_dims():
    model1 = _unet(dims=1, attention_resolutions=(2,))
    assert model1(torch.randn(1, 2, 37), torch.tensor([2])).shape == (1, 4, 37)
    model3 = _unet(dims=3, attention_resolutions=(), channel_mult=(1, 2))
    assert model3(torch.randn(1, 2, 3, 7, 6), torch.tensor([2])).shape == (1, 4, 3, 7, 6)


def test_fp16_conversion_round_trip():
    model = _unet()
    model.convert_to_fp16()
    assert model.inner_dtype == torch.float16
    model.convert_to_fp32()
    assert model.inner_dtype == torch.float32


# ---------------------------------------------------------------- nn helpers


def test_timestep_embedding():
    t = torch.tensor([0.0, 10.0])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(10 * freqs), torch.sin(10 * freqs)]))
    assert timestep_embedding(t, 7).shape == (2, 7)  # odd dims are zero-padded


def test_normalization_and_helpers():
    norm = normalization(64)
    assert isinstance(norm, GroupNorm32) and norm.num_groups == 32
    assert normalization(16).num_groups == 16  # tiny models: gcd(32, channels) groups
    x = torch.randn(2, 64, 4, 4).half()
    assert norm(x).dtype == torch.float16  # computed in float32, returned in the input dtype
    assert mean_flat(torch.ones(3, 2, 5)).shape == (3,)
    lin = zero_module(torch.nn.Linear(3, 3))
    assert float(lin.weight.detach().abs().sum()) == 0.0
    target, source = [torch.zeros(3)], [torch.ones(3)]
    update_ema(target, source, rate=0.9)
    torch.testing.assert_close(target[0], torch.full((3,), 0.1))
    f = torch.nn.Linear(3, 3)
    inp = torch.randn(2, 3, requires_grad=True)
    checkpoint(f, (inp,), f.parameters(), True).sum().backward()
    assert inp.grad is not None and f.weight.grad is not None


@pytest.mark.parametrize("shape", [(3, 64, 5, 4), (2, 16, 7)])
def test_group_norm_film_matches_norm_then_scale_shift(shape):
    torch.manual_seed(0)
    norm = normalization(shape[1])
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(*shape, requires_grad=True)
    film = torch.randn(shape[0], 2 * shape[1], *([1] * (len(shape) - 2)), requires_grad=True)

    def grads(fn):
        x.grad = film.grad = norm.weight.grad = norm.bias.grad = None
        scale, shift = film.chunk(2, dim=1)
        out = fn(scale, shift)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        return [out.detach()] + [t.grad.clone() for t in (x, film, norm.weight, norm.bias)]

    fused = grads(lambda scale, shift: norm.forward_film(x, scale, shift))
    ref = grads(lambda scale, shift: norm(x) * (1 + scale) + shift)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    half = norm.forward_film(x.detach().half(), *film.detach().half().chunk(2, dim=1))
    assert half.dtype == torch.float16
