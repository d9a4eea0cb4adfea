"""Tests for improved_diffusion.gaussian_diffusion (schedules, posterior, losses, samplers, hooks)."""

import functools
import math

import numpy as np
import pytest
import torch

from improved_diffusion import gaussian_diffusion as gd
from improved_diffusion.respace import SpacedDiffusion, space_timesteps
from improved_diffusion.script_util import create_gaussian_diffusion
from improved_diffusion.unet import UNetModel


def _diffusion(
    steps=20,
    schedule="cosine",
    mean=gd.ModelMeanType.EPSILON,
    var=gd.ModelVarType.LEARNED_RANGE,
    loss=gd.LossType.RESCALED_MSE,
    rescale_timesteps=False,
):
    return gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule(schedule, steps),
        model_mean_type=mean,
        model_var_type=var,
        loss_type=loss,
        rescale_timesteps=rescale_timesteps,
    )


def _tiny_unet(learn_sigma=True, attention=()):
    torch.manual_seed(0)
    return UNetModel(
        in_channels=2,
        model_channels=16,
        out_channels=4 if learn_sigma else 2,
        num_res_blocks=1,
        attention_resolutions=attention,
        channel_mult=(1, 2),
        use_scale_shift_norm=True,
    )


class _RecordingModel:
    """A model stand-in that records its inputs and predicts eps = 0.1 * x (learned range var = 0)."""

    def __init__(self, channels=2, learn_sigma=True):
        self.calls = []
        self.channels = channels
        self.learn_sigma = learn_sigma

    def __call__(self, x, t, **kwargs):
        self.calls.append((x.clone(), t.clone()))
        eps = 0.1 * x
        return torch.cat([eps, torch.zeros_like(x)], dim=1) if self.learn_sigma else eps


# ---------------------------------------------------------------- schedules


def test_linear_schedule_matches_formula():
    for steps in (1000, 250):
        betas = gd.get_named_beta_schedule("linear", steps)
        scale = 1000.0 / steps
        assert betas.dtype == np.float64 and betas.shape == (steps,)
        assert betas[0] == pytest.approx(scale * 1e-4)
        assert betas[-1] == pytest.approx(scale * 0.02)
        np.testing.assert_allclose(np.diff(betas), (scale * 0.02 - scale * 1e-4) / (steps - 1), rtol=1e-9)


def test_cosine_schedule_matches_eq17():
    steps, s = 1000, 0.008

    def f(t):
        return math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2

    betas = gd.get_named_beta_schedule("cosine", steps)
    expected = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(steps)])
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    assert betas.max() == pytest.approx(0.999)  # the last beta hits the clip
    assert (betas <= 0.999).all() and (betas > 0).all()
    # alpha_bar_t = f(t) / f(0) for every unclipped step (t = 1..T-1 in eq. 17's indexing).
    abar = np.cumprod(1 - betas)
    ref = np.array([f(t + 1) / f(0) for t in range(steps)])
    np.testing.assert_allclose(abar[:-1], ref[:-1], rtol=1e-9)


def test_bad_schedules_raise():
    with pytest.raises(ValueError, match="noise_schedule"):
        gd.get_named_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="more than 20 steps"):
        gd.get_named_beta_schedule("linear", 20)  # last beta would be 1: no signal left


# ---------------------------------------------------------------- forward process and posterior


def test_q_sample_formula():
    diff = _diffusion(steps=50, schedule="linear")
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 17, 49])
    xt = diff.q_sample(x0, t, noise=noise)
    for i, ti in enumerate(t.tolist()):
        abar = np.prod(1 - diff.betas[: ti + 1])
        ref = math.sqrt(abar) * x0[i] + math.sqrt(1 - abar) * noise[i]
        torch.testing.assert_close(xt[i], ref, rtol=1e-5, atol=1e-5)


def test_q_posterior_against_gaussian_conditioning():
    """Posterior of x_{t-1} from Bayes' rule on two Gaussians, computed independently in float64."""
    diff = _diffusion(steps=30, schedule="cosine")
    torch.manual_seed(0)
    x0 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    xt = torch.randn_like(x0)
    t = torch.tensor([1, 5, 17, 29])
    mean, var, log_var = diff.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        beta = diff.betas[ti]
        abar_prev = np.prod(1 - diff.betas[:ti])
        # prior x_{t-1} ~ N(sqrt(abar_prev) x0, 1 - abar_prev)
        # likelihood x_t | x_{t-1} ~ N(sqrt(1 - beta) x_{t-1}, beta)
        precision = 1 / (1 - abar_prev) + (1 - beta) / beta
        post_var = 1 / precision
        post_mean = post_var * (
            math.sqrt(abar_prev) / (1 - abar_prev) * x0[i] + math.sqrt(1 - beta) / beta * xt[i]
        )
        torch.testing.assert_close(mean[i], post_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var[i], torch.full_like(var[i], post_var), rtol=1e-5, atol=0)
        torch.testing.assert_close(log_var[i], torch.full_like(var[i], math.log(post_var)), rtol=1e-5, atol=0)
    # At t=0 the posterior collapses onto x0.
    mean0, var0, _ = diff.q_posterior_mean_variance(x0, xt, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(mean0, x0, rtol=1e-6, atol=1e-6)
    assert float(var0.abs().max()) == 0.0


# ---------------------------------------------------------------- model outputs


def test_p_mean_variance_learned_range_interpolates():
    diff = _diffusion(steps=10)
    x = torch.randn(2, 2, 4, 4)
    t = torch.tensor([3, 7])
    lo = diff.p_mean_variance(lambda x, t: torch.cat([x, -torch.ones_like(x)], 1), x, t)["log_variance"]
    hi = diff.p_mean_variance(lambda x, t: torch.cat([x, torch.ones_like(x)], 1), x, t)["log_variance"]
    for i, ti in enumerate(t.tolist()):
        assert float(lo[i].mean()) == pytest.approx(diff.posterior_log_variance_clipped[ti], rel=1e-5)
        assert float(hi[i].mean()) == pytest.approx(math.log(diff.betas[ti]), rel=1e-5)


def test_denoised_fn_sees_unclipped_xstart_then_clip():
    diff = _diffusion(steps=10, var=gd.ModelVarType.FIXED_SMALL, mean=gd.ModelMeanType.START_X)
    x = torch.zeros(1, 2, 4, 4)
    seen = []

    def denoised_fn(x0, t):
        seen.append(x0.clone())
        return x0 * 2

    model = lambda x, t: torch.full_like(x, 3.0)  # noqa: E731
    out = diff.p_mean_variance(model, x, torch.tensor([5]), clip_denoised=True, denoised_fn=denoised_fn)
    assert float(seen[0].max()) == pytest.approx(3.0)  # before clipping
    assert float(out["pred_xstart"].max()) == pytest.approx(1.0)  # clipped after denoised_fn
    out = diff.p_mean_variance(model, x, torch.tensor([5]), clip_denoised=False, denoised_fn=denoised_fn)
    assert float(out["pred_xstart"].max()) == pytest.approx(6.0)


def test_fixed_variance_model_output_shape_checked():
    diff = _diffusion(steps=10, var=gd.ModelVarType.FIXED_LARGE)
    with pytest.raises(ValueError, match="learn_sigma"):
        diff.p_mean_variance(lambda x, t: torch.cat([x, x], 1), torch.zeros(1, 2, 4, 4), torch.tensor([1]))


# ---------------------------------------------------------------- training losses


def test_hybrid_loss_finite_and_vb_stops_gradient_to_mean():
    diff = _diffusion(steps=40, loss=gd.LossType.MSE)
    torch.manual_seed(0)
    x0 = torch.rand(3, 2, 8, 8) * 2 - 1
    raw = torch.randn(3, 4, 8, 8, requires_grad=True)
    model = lambda x, t: raw * 1.0  # noqa: E731 - output is a leaf we can read gradients from
    t = torch.tensor([0, 10, 39])
    noise = torch.randn_like(x0)
    terms = diff.training_losses(model, x0, t, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"}
    for v in terms.values():
        assert v.shape == (3,) and torch.isfinite(v).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])

    terms["vb"].sum().backward(retain_graph=True)
    assert float(raw.grad[:, :2].abs().max()) == 0.0  # no gradient from L_vlb to the mean (eps) channels
    assert float(raw.grad[:, 2:].abs().max()) > 0.0  # it trains the variance channels
    raw.grad = None
    terms["mse"].sum().backward()
    assert float(raw.grad[:, 2:].abs().max()) == 0.0 and float(raw.grad[:, :2].abs().max()) > 0.0

    # RESCALED_MSE scales only the vb term by num_timesteps / 1000.
    rescaled = _diffusion(steps=40, loss=gd.LossType.RESCALED_MSE).training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(rescaled["vb"], terms["vb"] * 40 / 1000)
    torch.testing.assert_close(rescaled["mse"], terms["mse"])


def test_kl_losses_and_targets():
    torch.manual_seed(0)
    x0 = torch.rand(2, 2, 8, 8) * 2 - 1
    t = torch.tensor([0, 5])
    noise = torch.randn_like(x0)
    out = torch.randn(2, 4, 8, 8)
    kl = _diffusion(steps=10, loss=gd.LossType.KL).training_losses(lambda x, t: out, x0, t, noise=noise)
    rkl = _diffusion(steps=10, loss=gd.LossType.RESCALED_KL).training_losses(
        lambda x, t: out, x0, t, noise=noise
    )
    assert set(kl) == {"loss"} and torch.isfinite(kl["loss"]).all()
    torch.testing.assert_close(rkl["loss"], kl["loss"] * 10)
    # START_X with a fixed variance: plain MSE to x0.
    diff = _diffusion(
        steps=10, mean=gd.ModelMeanType.START_X, var=gd.ModelVarType.FIXED_LARGE, loss=gd.LossType.MSE
    )
    terms = diff.training_losses(lambda x, t: torch.zeros_like(x), x0, t, noise=noise)
    assert set(terms) == {"loss", "mse"}
    torch.testing.assert_close(terms["mse"], (x0**2).mean(dim=(1, 2, 3)))


def test_tiny_unet_overfits_one_image():
    """The model + hybrid loss can fit one 16x16 image at fixed (t, noise): loss falls >= 90 %."""
    torch.manual_seed(0)
    diff = create_gaussian_diffusion(
        steps=100,
        learn_sigma=True,
        noise_schedule="cosine",
        rescale_timesteps=True,
        rescale_learned_sigmas=True,
    )
    model = _tiny_unet(learn_sigma=True)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    image = torch.stack([torch.exp(-4 * (xx**2 + yy**2)) * 2 - 1, 0.5 * xx * yy])[None]
    x0 = image.repeat(4, 1, 1, 1)
    t = torch.tensor([5, 30, 60, 90])
    noise = torch.randn_like(x0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):  # ~20 steps reach 10 %; 40 leave margin
        loss = diff.training_losses(model, x0, t, noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1])
    assert min(losses[-5:]) <= 0.1 * losses[0], (losses[0], losses[-5:])


# ---------------------------------------------------------------- sampling loops


def test_sampling_loops_shape_and_ddim_determinism():
    diff = create_gaussian_diffusion(
        steps=100, learn_sigma=True, timestep_respacing="5", rescale_timesteps=True
    )
    model = _tiny_unet().eval()
    shape = (1, 2, 18, 13)  # odd width: the UNet pads and crops
    torch.manual_seed(1)
    noise = torch.randn(shape)
    assert diff.p_sample_loop(model, shape).shape == shape
    assert diff.p_sample_loop(model, shape, noise=noise, progress=True).shape == shape
    a = diff.ddim_sample_loop(model, shape, noise=noise, eta=0.0)
    torch.manual_seed(123)  # a different global RNG state must not matter for eta = 0
    b = diff.ddim_sample_loop(model, shape, noise=noise, eta=0.0)
    assert a.shape == shape
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = diff.ddim_sample_loop(model, shape, noise=noise, eta=1.0)
    assert c.shape == shape and torch.isfinite(c).all()
    steps = list(diff.ddim_sample_loop_progressive(model, shape, noise=noise))
    assert len(steps) == 5 and set(steps[-1]) == {"sample", "pred_xstart"}


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_start_t_and_step_fn(loop):
    base = dict(
        betas=gd.get_named_beta_schedule("cosine", 20),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.LEARNED_RANGE,
        loss_type=gd.LossType.MSE,
    )
    diff = SpacedDiffusion(use_timesteps=space_timesteps(20, "5"), **base)
    assert diff.timestep_map == [0, 5, 10, 14, 19]
    model = _RecordingModel()
    shape = (2, 2, 4, 4)
    x_start = torch.randn(shape)
    calls = []

    def step_fn(x_prev, t):
        calls.append((x_prev.clone(), t))
        return torch.full_like(x_prev, float(t))  # a recognisable replacement

    out = getattr(diff, loop)(model, shape, noise=x_start, start_t=3, step_fn=step_fn)
    assert [t for _, t in calls] == [3, 2, 1, 0]  # one call per step, with the index just taken
    assert all(isinstance(t, int) for _, t in calls)
    # The chain starts from the given x at step 3 (base timestep 14) and continues from step_fn's output.
    torch.testing.assert_close(model.calls[0][0], x_start)
    assert [int(t[0]) for _, t in model.calls] == [14, 10, 5, 0]
    for (x_in, _), t_prev in zip(model.calls[1:], [3, 2, 1]):
        assert float(x_in.min()) == float(x_in.max()) == float(t_prev)
    torch.testing.assert_close(out, torch.zeros(shape))  # the final sample is step_fn's output at t = 0

    # Defaults: start at num_timesteps - 1 from fresh noise.
    model2 = _RecordingModel()
    getattr(diff, loop)(model2, shape)
    assert [int(t[0]) for _, t in model2.calls] == [19, 14, 10, 5, 0]

    for bad in (-1, 5, 2.5):
        with pytest.raises(ValueError, match="start_t"):
            getattr(diff, loop)(model, shape, start_t=bad)
    with pytest.raises(ValueError, match="noise shape"):
        getattr(diff, loop)(model, shape, noise=torch.zeros(1, 2, 4, 4))


def test_public_loops_are_the_generic_loop_with_their_step():
    """p_sample_loop / ddim_sample_loop are sample_loop_progressive driven by p_sample / ddim_sample, and
    any other step function with their signature plugs into the same loop and hooks."""
    diff = _diffusion(steps=6)
    model = _RecordingModel()
    shape = (2, 2, 4, 4)
    for loop, step in [
        (diff.p_sample_loop, diff.p_sample),
        (functools.partial(diff.ddim_sample_loop, eta=0.5), functools.partial(diff.ddim_sample, eta=0.5)),
    ]:
        torch.manual_seed(0)
        final = loop(model, shape, start_t=4)
        torch.manual_seed(0)
        steps = list(diff.sample_loop_progressive(functools.partial(step, model), model, shape, start_t=4))
        assert len(steps) == 5
        torch.testing.assert_close(final, steps[-1]["sample"], rtol=0, atol=0)

    def halve(x, t):
        return {"sample": 0.5 * x, "pred_xstart": x}

    ts = []

    def add_one(x, t):
        ts.append(t)
        return x + 1

    steps = list(diff.sample_loop_progressive(halve, None, shape, noise=torch.ones(shape), step_fn=add_one))
    assert ts == [5, 4, 3, 2, 1, 0] and len(steps) == 6
    torch.testing.assert_close(steps[-1]["sample"], torch.full(shape, 1.984375))  # x -> x / 2 + 1, six times


def test_ddim_matches_closed_form_step():
    diff = _diffusion(steps=10, var=gd.ModelVarType.FIXED_SMALL, mean=gd.ModelMeanType.EPSILON)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x)
    t = 6
    out = diff.ddim_sample(lambda x, t: eps, x, torch.tensor([t]), clip_denoised=False, eta=0.0)
    abar, abar_prev = np.prod(1 - diff.betas[: t + 1]), np.prod(1 - diff.betas[:t])
    x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    ref = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps
    torch.testing.assert_close(out["sample"], ref, rtol=1e-5, atol=1e-5)
    # ddim_reverse_sample inverts that step at eta = 0 (the same eps at both ends).
    back = diff.ddim_reverse_sample(
        lambda x, t: eps, out["sample"], torch.tensor([t - 1]), clip_denoised=False
    )
    torch.testing.assert_close(back["sample"], x, rtol=1e-4, atol=1e-4)


def test_calc_bpd_loop_tiny_model():
    diff = create_gaussian_diffusion(steps=8, learn_sigma=True, noise_schedule="cosine")
    model = _tiny_unet().eval()
    x0 = torch.rand(2, 2, 16, 16) * 2 - 1
    out = diff.calc_bpd_loop(model, x0, clip_denoised=True)
    assert out["total_bpd"].shape == (2,) and out["prior_bpd"].shape == (2,)
    for k in ("vb", "xstart_mse", "mse"):
        assert out[k].shape == (2, 8) and torch.isfinite(out[k]).all()
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    assert (out["vb"][:, 1:] >= 0).all()  # KL terms are non-negative
