import pytest
import torch

from tread_fx.guidance import cfg, sparse_cfg, sparse_guidance


def _model(x, t, y):
    """A deterministic 'model' whose output depends on x, t and y."""
    yv = y.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    tv = torch.as_tensor(t, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return x * (1 + yv) + tv


class Counter:
    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)
        return self.fn(*args)


X = torch.arange(6.0).reshape(2, 3)
T = torch.tensor([0.1, 0.2])
Y = torch.tensor([1, 2])
NULL = 10


# ---------------------------------------------------------------------------
# cfg
# ---------------------------------------------------------------------------


def test_cfg_scale_one_is_conditional():
    fn = Counter(_model)
    out = cfg(fn, X, T, Y, NULL, 1.0)
    assert torch.equal(out, _model(X, T, Y))
    assert len(fn.calls) == 1


def test_cfg_formula_with_one_batched_call():
    fn = Counter(_model)
    out = cfg(fn, X, T, Y, NULL, 4.0)
    cond = _model(X, T, Y)
    uncond = _model(X, T, torch.full_like(Y, NULL))
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond))
    assert len(fn.calls) == 1
    xx, tt, yy = fn.calls[0]
    assert xx.shape == (4, 3) and tt.shape == (4,)
    assert yy.tolist() == [1, 2, NULL, NULL]
    # scalar t is expanded; scale 0 is the unconditional prediction
    out_scalar_t = cfg(_model, X, 0.5, Y, NULL, 2.0)
    c, u = _model(X, torch.full((2,), 0.5), Y), _model(X, torch.full((2,), 0.5), torch.full_like(Y, NULL))
    torch.testing.assert_close(out_scalar_t, u + 2.0 * (c - u))
    torch.testing.assert_close(cfg(_model, X, T, Y, NULL, 0.0), u + (T - 0.5).view(2, 1))


def test_cfg_null_tensor_and_errors():
    out = cfg(_model, X, T, Y, torch.tensor([0, 0]), 3.0)
    c, u = _model(X, T, Y), _model(X, T, torch.zeros_like(Y))
    torch.testing.assert_close(out, u + 3.0 * (c - u))
    with pytest.raises(ValueError, match="null_y"):
        cfg(_model, X, T, Y, torch.tensor([0, 0, 0]), 3.0)
    with pytest.raises(ValueError, match="y must"):
        cfg(_model, X, T, Y[:1], NULL, 3.0)


# ---------------------------------------------------------------------------
# sparse guidance
# ---------------------------------------------------------------------------


def _sparse_model(x, t, y, ratio):
    return _model(x, t, y) * (1 - ratio) + ratio


def test_sparse_guidance_equal_gammas_single_call_returns_output():
    sentinel = torch.randn(2, 3)
    calls = []

    def model_fn(x, t, y, ratio):
        calls.append(ratio)
        return sentinel

    out = sparse_guidance(model_fn, X, T, Y, gamma_strong=0.4, gamma_weak=0.4, scale=1.5)
    assert out is sentinel
    assert calls == [0.4]


def test_sparse_guidance_formula_both_branches_conditional():
    fn = Counter(_sparse_model)
    out = sparse_guidance(fn, X, T, Y, gamma_strong=0.3, gamma_weak=0.7, scale=1.5)
    vs, vw = _sparse_model(X, T, Y, 0.3), _sparse_model(X, T, Y, 0.7)
    torch.testing.assert_close(out, vw + 1.5 * (vs - vw))
    assert [c[3] for c in fn.calls] == [0.3, 0.7]
    for c in fn.calls:
        assert torch.equal(c[2], Y)  # conditional in both branches
    # scale 1 -> strong branch only
    fn1 = Counter(_sparse_model)
    assert torch.equal(sparse_guidance(fn1, X, T, Y, gamma_strong=0.0, gamma_weak=0.5, scale=1), _sparse_model(X, T, Y, 0.0))
    assert len(fn1.calls) == 1


@pytest.mark.parametrize(
    "gs, gw, name",
    [(1.0, 0.5, "gamma_strong"), (-0.1, 0.5, "gamma_strong"), (0.2, 1.0, "gamma_weak"),
     (0.2, float("nan"), "gamma_weak"), (True, 0.5, "gamma_strong")],
)
def test_sparse_guidance_ratio_errors_name_argument(gs, gw, name):
    with pytest.raises(ValueError, match=name):
        sparse_guidance(_sparse_model, X, T, Y, gamma_strong=gs, gamma_weak=gw, scale=1.5)
    with pytest.raises(ValueError, match=name):
        sparse_cfg(_sparse_model, X, T, Y, NULL, gamma_strong=gs, gamma_weak=gw, scale=1.5, cfg_scale=2.0)


def test_sparse_guidance_order_checked():
    with pytest.raises(ValueError, match="gamma_strong must be <= gamma_weak"):
        sparse_guidance(_sparse_model, X, T, Y, gamma_strong=0.7, gamma_weak=0.3, scale=1.5)


# ---------------------------------------------------------------------------
# sparse_cfg
# ---------------------------------------------------------------------------


def test_sparse_cfg_formula_and_reductions():
    fn = Counter(_sparse_model)
    out = sparse_cfg(fn, X, T, Y, NULL, gamma_strong=0.3, gamma_weak=0.7, scale=1.5, cfg_scale=4.0)
    null = torch.full_like(Y, NULL)

    def g(gamma):
        c, u = _sparse_model(X, T, Y, gamma), _sparse_model(X, T, null, gamma)
        return u + 4.0 * (c - u)

    torch.testing.assert_close(out, g(0.7) + 1.5 * (g(0.3) - g(0.7)))
    assert len(fn.calls) == 2  # one batched [cond; uncond] call per branch
    # equal gammas -> plain CFG at that ratio, one call
    fn_eq = Counter(_sparse_model)
    out_eq = sparse_cfg(fn_eq, X, T, Y, NULL, gamma_strong=0.5, gamma_weak=0.5, scale=1.5, cfg_scale=4.0)
    torch.testing.assert_close(out_eq, cfg(lambda x, t, y: _sparse_model(x, t, y, 0.5), X, T, Y, NULL, 4.0))
    assert len(fn_eq.calls) == 1
    # cfg_scale 1 -> sparse guidance
    out_sg = sparse_cfg(_sparse_model, X, T, Y, NULL, gamma_strong=0.3, gamma_weak=0.7, scale=1.5, cfg_scale=1.0)
    torch.testing.assert_close(out_sg, sparse_guidance(_sparse_model, X, T, Y, gamma_strong=0.3, gamma_weak=0.7, scale=1.5))


def test_sparse_guidance_with_a_routed_model():
    import tread_fx
    from tread_fx.guidance import routed_fn
    from conftest import dit_inputs, tiny_dit

    model = tiny_dit(depth=6, class_dropout_prob=0.0)
    routed = tread_fx.route(model, "1:4@0.5").eval()
    x, t, y = dit_inputs()
    seen = []
    model.blocks[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    fn = routed_fn(routed)
    with torch.no_grad():
        v = sparse_guidance(fn, x, t, y, gamma_strong=0.25, gamma_weak=0.75, scale=1.5)
        assert sorted(seen) == [4, 12]  # the weak branch routes 75 %, the strong 25 %
        torch.manual_seed(0)
        strong = fn(x, t, y, 0.25)
        assert v.shape == strong.shape and torch.isfinite(v).all()
        assert torch.equal(fn(x, t, y, 0.0), model.eval()(x, t, y))
    assert routed.selectors[0].selection_ratio == 0.5  # restored
