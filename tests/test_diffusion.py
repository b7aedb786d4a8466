import io
import math

import pytest
import torch
from torch import nn

from tread_fx.diffusion import (
    EDM,
    EMA,
    DiffusionLossTerms,
    RectifiedFlow,
    drop_labels,
    edm_sample,
    edm_sigmas,
    euler_sample,
)

SD = 0.5


# ---------------------------------------------------------------------------
# EDM
# ---------------------------------------------------------------------------


def test_edm_defaults():
    e = EDM()
    assert (e.sigma_data, e.P_mean, e.P_std, e.sigma_min, e.sigma_max, e.rho) == (0.5, -1.2, 1.2, 0.002, 80, 7)


def test_edm_loss_weight_hand_values():
    e = EDM()
    # (s^2 + 0.25) / (0.5 s)^2
    got = e.loss_weight(torch.tensor([0.5, 1.0, 2.0]))
    torch.testing.assert_close(got, torch.tensor([8.0, 5.0, 4.25]))
    assert float(e.loss_weight(0.5)) == pytest.approx(8.0)


def test_edm_coefficients_hand_values():
    c_skip, c_out, c_in, c_noise = EDM().coefficients(torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(c_skip, torch.tensor([0.5, 0.25 / 4.25]))
    torch.testing.assert_close(c_out, torch.tensor([0.25 / math.sqrt(0.5), 1.0 / math.sqrt(4.25)]))
    torch.testing.assert_close(c_in, torch.tensor([1 / math.sqrt(0.5), 1 / math.sqrt(4.25)]))
    torch.testing.assert_close(c_noise, torch.tensor([math.log(0.5) / 4, math.log(2.0) / 4]))


def test_edm_sample_sigma_is_lognormal_and_seeded():
    e = EDM()
    s = e.sample_sigma(20000, "cpu", torch.Generator().manual_seed(0))
    assert s.shape == (20000,) and s.dtype == torch.float32 and bool((s > 0).all())
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.03)
    assert s.log().std().item() == pytest.approx(1.2, abs=0.03)
    a = e.sample_sigma(4, "cpu", torch.Generator().manual_seed(3))
    b = e.sample_sigma(4, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_edm_precondition_known_model_and_learn_sigma_channels():
    e = EDM()
    calls = []

    def model(a, c_noise, y):
        calls.append((a.clone(), c_noise.clone(), y))
        f = 2 * a + c_noise.view(-1, 1, 1, 1)
        return torch.cat([f, torch.full_like(f, 1e6)], dim=1)  # 2C channels, 2nd half junk

    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2) / 10
    sigma = torch.tensor([0.5, 2.0])
    d = e.precondition(model, x, sigma, "label")
    c_skip = torch.tensor([0.5, 0.25 / 4.25]).view(2, 1, 1, 1)
    c_out = torch.tensor([0.25 / math.sqrt(0.5), 1.0 / math.sqrt(4.25)]).view(2, 1, 1, 1)
    c_in = torch.tensor([1 / math.sqrt(0.5), 1 / math.sqrt(4.25)]).view(2, 1, 1, 1)
    c_noise = torch.tensor([math.log(0.5) / 4, math.log(2.0) / 4])
    expected = c_skip * x + c_out * (2 * c_in * x + c_noise.view(2, 1, 1, 1))
    torch.testing.assert_close(d, expected)
    assert d.shape == x.shape
    a, cn, y = calls[0]
    torch.testing.assert_close(a, c_in * x)
    torch.testing.assert_close(cn, c_noise)
    assert cn.shape == (2,) and y == "label"
    # sigma as a Python number / [B,1,1,1] gives the same
    torch.testing.assert_close(e.precondition(model, x, sigma.view(2, 1, 1, 1), "label"), expected)
    d_scalar = e.precondition(model, x, 0.5, "label")
    torch.testing.assert_close(d_scalar[0], expected[0])


def test_edm_precondition_rejects_too_few_channels():
    with pytest.raises(ValueError, match="channels"):
        EDM().precondition(lambda a, c: a[:, :1], torch.zeros(1, 3, 2, 2), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        EDM().precondition(lambda a, c: a, torch.zeros(2, 3, 2, 2), torch.ones(3))


def test_edm_loss_terms_with_fixed_sigma_and_noise():
    e = EDM()
    x0 = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])
    noise = torch.tensor([[[[0.2, 0.4], [-0.6, 1.0]]]])
    sigma = torch.tensor([2.0])

    def model(a, c_noise):
        return torch.zeros_like(a)  # D = c_skip * x

    terms = e.loss(model, x0, sigma=sigma, noise=noise, reduction="none")
    assert isinstance(terms, DiffusionLossTerms)
    x_noisy = x0 + 2.0 * noise
    d = (0.25 / 4.25) * x_noisy
    per_el = (4.25 / 1.0) * (d - x0) ** 2
    torch.testing.assert_close(terms.noisy_input, x_noisy)
    torch.testing.assert_close(terms.prediction, d)
    torch.testing.assert_close(terms.loss_per_element, per_el)
    assert terms.loss is terms.loss_per_element
    assert torch.equal(terms.target, x0)
    torch.testing.assert_close(terms.noise_level, sigma)
    mean_terms = e.loss(model, x0, sigma=sigma, noise=noise)
    torch.testing.assert_close(mean_terms.loss, per_el.mean())
    assert mean_terms.loss.ndim == 0


def test_edm_loss_is_zero_for_the_ideal_denoiser_of_a_point_mass():
    e = EDM()
    x_star = torch.tensor([[[[0.3, -0.7], [1.1, 0.0]]]], dtype=torch.float64).expand(4, 1, 2, 2)

    def ideal(a, c_noise):  # F such that D(x; sigma) == x_star exactly
        sigma = torch.exp(4 * c_noise).view(-1, 1, 1, 1)
        x = a * torch.sqrt(sigma**2 + SD**2)
        c_skip = SD**2 / (sigma**2 + SD**2)
        c_out = sigma * SD / torch.sqrt(sigma**2 + SD**2)
        return (x_star - c_skip * x) / c_out

    terms = e.loss(ideal, x_star.clone(), generator=torch.Generator().manual_seed(0))
    assert terms.loss.dtype == torch.float64
    assert terms.loss.item() < 1e-10


def test_edm_loss_seeded_and_reduction_checked():
    e = EDM()
    lin = nn.Conv2d(2, 4, 1)

    def model(a, c_noise, y):
        return lin(a) * (1 + c_noise.view(-1, 1, 1, 1)) + y.view(-1, 1, 1, 1)

    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0.0, 1.0, 2.0])
    t1 = e.loss(model, x0, y, generator=torch.Generator().manual_seed(5))
    t2 = e.loss(model, x0, y, generator=torch.Generator().manual_seed(5))
    t3 = e.loss(model, x0, y, generator=torch.Generator().manual_seed(6))
    assert torch.equal(t1.loss, t2.loss) and not torch.equal(t1.loss, t3.loss)
    t1.loss.backward()
    assert lin.weight.grad is not None
    with pytest.raises(ValueError, match="reduction"):
        e.loss(model, x0, y, reduction="sum")
    # low precision inputs keep their dtype
    tb = e.loss(lambda a, c: a, x0.bfloat16(), generator=torch.Generator().manual_seed(0), reduction="none")
    assert tb.loss_per_element.dtype == torch.bfloat16 and tb.noise_level.dtype == torch.float32


def test_edm_sigmas_schedule():
    s = edm_sigmas(5)
    assert s.shape == (6,)
    assert s[0].item() == pytest.approx(80.0) and s[4].item() == pytest.approx(0.002) and s[5].item() == 0
    assert bool((s[:-1] > s[1:]).all())
    rho = 7.0
    mid = (80 ** (1 / rho) + 0.5 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    assert s[2].item() == pytest.approx(mid)
    assert edm_sigmas(1).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError, match="steps"):
        edm_sigmas(0)


def test_edm_sample_point_mass_is_exact():
    x_star = torch.tensor([[1.5, -0.25, 0.75]], dtype=torch.float64)
    nfe = []

    def denoise(x, sigma):
        nfe.append(sigma)
        assert sigma.shape == (2,)
        return x_star.expand_as(x)

    noise = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for steps in (1, 3, 40):
        nfe.clear()
        out = edm_sample(denoise, noise, steps=steps)
        torch.testing.assert_close(out, x_star.expand(2, 3), atol=1e-12, rtol=0)
        assert len(nfe) == 2 * steps - 1


def _gauss_denoiser(mu, s):
    def denoise(x, sigma):
        sig = sigma.view(-1, *([1] * (x.ndim - 1)))
        return mu + s**2 / (s**2 + sig**2) * (x - mu)

    return denoise


def test_edm_sample_gaussian_matches_ode_solution():
    mu, s = 0.7, 0.3
    z = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # dx/dsigma = (x - D)/sigma => x(sigma) - mu  proportional to sqrt(s^2 + sigma^2)
    exact = mu + (80.0 * z - mu) * s / math.sqrt(s**2 + 80.0**2)
    errs = []
    for steps in (10, 40, 160):
        out = edm_sample(_gauss_denoiser(mu, s), z, steps=steps)
        errs.append((out - exact).abs().max().item())
    assert errs[1] < 1e-2
    # Heun is 2nd order: 4x the steps -> ~16x smaller error
    assert errs[0] / errs[1] > 10 and errs[1] / errs[2] > 10


def test_edm_sample_seeded_from_shape():
    den = _gauss_denoiser(0.0, 0.5)
    a = edm_sample(den, (3, 2), steps=4, generator=torch.Generator().manual_seed(0))
    b = edm_sample(den, (3, 2), steps=4, generator=torch.Generator().manual_seed(0))
    c = edm_sample(den, (3, 2), steps=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 2) and a.dtype == torch.float32


def test_edm_sample_method_uses_precondition():
    e = EDM(sigma_max=10.0)
    out = e.sample(lambda a, c: torch.zeros_like(a), torch.ones(1, 1, 2, 2, dtype=torch.float64), steps=40)
    # F = 0 gives D = c_skip x, the ideal denoiser of data ~ N(0, sd^2): x(0) = x_T sd / sqrt(sd^2 + sigma_max^2)
    exact = 10.0 * SD / math.sqrt(SD**2 + 100.0)
    assert out.flatten()[0].item() == pytest.approx(exact, rel=1e-2)


# ---------------------------------------------------------------------------
# Rectified flow
# ---------------------------------------------------------------------------


def test_rf_sample_t_logit_normal():
    rf = RectifiedFlow()
    t = rf.sample_t(20000, "cpu", torch.Generator().manual_seed(0))
    assert bool(((t > 0) & (t < 1)).all())
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.0, abs=0.03)
    assert logit.std().item() == pytest.approx(1.0, abs=0.03)
    t2 = RectifiedFlow(logit_mean=1.0, logit_std=0.5).sample_t(20000, None, torch.Generator().manual_seed(0))
    lg = torch.log(t2 / (1 - t2))
    assert lg.mean().item() == pytest.approx(1.0, abs=0.03)


def test_rf_loss_terms_known_model():
    rf = RectifiedFlow()
    x0 = torch.tensor([[[[1.0, 2.0]]], [[[-1.0, 0.5]]]])
    noise = torch.tensor([[[[0.5, 0.0]]], [[[1.0, -1.0]]]])
    t = torch.tensor([0.25, 0.5])
    seen = {}

    def model(x_t, tt, y):
        seen["t"], seen["y"] = tt, y
        v = 3 * x_t + tt.view(-1, 1, 1, 1)
        return torch.cat([v, v + 100], dim=1)  # learn-sigma style 2C output

    terms = rf.loss(model, x0, "y", t=t, noise=noise, reduction="none")
    tb = t.view(2, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * noise
    v = 3 * x_t + tb
    torch.testing.assert_close(terms.noisy_input, x_t)
    torch.testing.assert_close(terms.prediction, v)
    torch.testing.assert_close(terms.target, noise - x0)
    torch.testing.assert_close(terms.loss_per_element, (v - (noise - x0)) ** 2)
    torch.testing.assert_close(seen["t"], t)
    assert seen["y"] == "y"
    m = rf.loss(model, x0, "y", t=t, noise=noise)
    torch.testing.assert_close(m.loss, ((v - (noise - x0)) ** 2).mean())


def test_rf_loss_zero_for_ideal_velocity_of_point_mass_and_seeded():
    rf = RectifiedFlow()
    x_star = torch.tensor([[[[0.2, -0.4]]]], dtype=torch.float64).expand(5, 1, 1, 2).clone()

    def ideal(x_t, t):
        return (x_t - x_star) / t.view(-1, 1, 1, 1)

    g = torch.Generator().manual_seed(0)
    terms = rf.loss(ideal, x_star, generator=g)
    assert terms.loss.item() < 1e-20
    a = rf.loss(ideal, x_star, generator=torch.Generator().manual_seed(1), reduction="none")
    b = rf.loss(ideal, x_star, generator=torch.Generator().manual_seed(1), reduction="none")
    assert torch.equal(a.noisy_input, b.noisy_input)


def test_euler_point_mass_exact_and_gaussian_converges():
    x_star = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    calls = []

    def v_point(x, t):
        calls.append(t[0].item())
        return (x - x_star) / t.view(-1, 1)

    z = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = euler_sample(v_point, z, steps=4)
    torch.testing.assert_close(out, x_star.expand(8, 2), atol=1e-12, rtol=0)
    assert calls == [1.0, 0.75, 0.5, 0.25]

    mu, s = 0.3, 0.5

    def v_gauss(x, t):  # E[eps - x0 | x_t] for x0 ~ N(mu, s^2)
        tt = t.view(-1, 1)
        a = 1 - tt
        var = a**2 * s**2 + tt**2
        return -mu + (tt - a * s**2) / var * (x - a * mu)

    exact = mu + s * z  # the flow maps noise z at t=1 to mu + s z at t=0
    errs = [(euler_sample(v_gauss, z, steps=n) - exact).abs().max().item() for n in (10, 100, 1000)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 5e-3


def test_euler_seeded_and_rf_sample_method():
    rf = RectifiedFlow()
    model = lambda x, t: x * 0.5  # noqa: E731
    a = rf.sample(model, (2, 3), steps=5, generator=torch.Generator().manual_seed(4))
    b = rf.sample(model, (2, 3), steps=5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, z * (1 - 0.5 / 5) ** 5)
    with pytest.raises(ValueError, match="steps"):
        euler_sample(model, z, steps=0)


# ---------------------------------------------------------------------------
# drop_labels
# ---------------------------------------------------------------------------


def test_drop_labels_rate_and_null_class():
    y = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    out = drop_labels(y, 0.1, 10, generator=torch.Generator().manual_seed(1))
    dropped = out == 10
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert torch.equal(out[~dropped], y[~dropped])
    assert out.dtype == y.dtype and y.max() < 10  # input untouched
    again = drop_labels(y, 0.1, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert torch.equal(drop_labels(y, 0.0, 10), y)
    assert bool((drop_labels(y, 1.0, 10) == 10).all())


def test_drop_labels_embeddings_and_errors():
    y = torch.ones(4, 3)
    null = torch.tensor([7.0, 8.0, 9.0])
    out = drop_labels(y, 1.0, null)
    assert torch.equal(out, null.expand(4, 3))
    with pytest.raises(ValueError, match="p must"):
        drop_labels(y, 1.5, null)
    with pytest.raises(ValueError, match="p must"):
        drop_labels(y, -0.1, null)


# ---------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)


def _set(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model.bn.running_mean.fill_(value)


def test_ema_math_decay_half():
    net = _Net()
    _set(net, 1.0)
    ema = EMA(net, decay=0.5)
    _set(net, 3.0)
    ema.update(net)
    for name, s in ema.shadow.items():
        assert torch.equal(s, torch.full_like(s, 2.0)), name
    assert torch.equal(ema.buffers["bn.running_mean"], torch.full((2,), 3.0))  # buffers copied
    _set(net, 6.0)
    ema.update(net)
    assert torch.equal(ema.shadow["lin.weight"], torch.full((2, 2), 4.0))
    ema.update(net, decay=0.0)
    assert torch.equal(ema.shadow["lin.weight"], torch.full((2, 2), 6.0))
    assert ema.num_updates == 3
    # shadow tensors are independent copies on the parameters' device
    assert ema.shadow["lin.weight"].data_ptr() != net.lin.weight.data_ptr()
    assert ema.shadow["lin.weight"].device == net.lin.weight.device
    assert not ema.shadow["lin.weight"].requires_grad


def test_ema_buffers_averaged_on_request_and_copy_to():
    net = _Net()
    _set(net, 0.0)
    ema = EMA(net, decay=0.5, ema_buffers=True)
    _set(net, 2.0)
    net.bn.num_batches_tracked.fill_(7)
    ema.update(net)
    assert torch.equal(ema.buffers["bn.running_mean"], torch.full((2,), 1.0))
    assert ema.buffers["bn.num_batches_tracked"].item() == 7
    other = _Net()
    ema.copy_to(other)
    assert torch.equal(other.lin.weight, torch.full((2, 2), 1.0))
    assert torch.equal(other.bn.running_mean, torch.full((2,), 1.0))


def test_ema_state_dict_round_trip_and_name_checks():
    net = _Net()
    _set(net, 1.0)
    ema = EMA(net, decay=0.5)
    _set(net, 5.0)
    ema.update(net)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    fresh = EMA(_Net(), decay=0.9)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.decay == 0.5 and fresh.num_updates == 1
    for k in ema.shadow:
        assert torch.equal(fresh.shadow[k], ema.shadow[k])
    for k in ema.buffers:
        assert torch.equal(fresh.buffers[k], ema.buffers[k])
    with pytest.raises(KeyError, match="names"):
        ema.update(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="decay"):
        EMA(net, decay=1.5)
