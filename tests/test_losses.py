import math

import pytest
import torch

from tread_fx.losses import maskdit_term, patchify, patchify_loss, tokens_to_patches, tread_loss

T, F = True, False


# ---------------------------------------------------------------------------
# patchify / patchify_loss
# ---------------------------------------------------------------------------


def test_patchify_loss_hand_values_1x1x4x4():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # grid (row, col): (0,0)=[0,1,4,5] (0,1)=[2,3,6,7] (1,0)=[8,9,12,13] (1,1)=[10,11,14,15]
    got = patchify_loss(x, 2)
    assert got.shape == (1, 4)
    torch.testing.assert_close(got, torch.tensor([[2.5, 4.5, 10.5, 12.5]]))
    assert tokens_to_patches is patchify_loss


def test_patchify_loss_means_over_channels_and_non_square_grid():
    c0 = torch.arange(8.0).reshape(1, 1, 2, 4)  # 1 row of 2 patches
    c1 = 100 + torch.zeros(1, 1, 2, 4)
    got = patchify_loss(torch.cat([c0, c1], 1), 2)
    # channel 0 patches: [0,1,4,5] -> 2.5, [2,3,6,7] -> 4.5; channel 1: 100
    torch.testing.assert_close(got, torch.tensor([[(2.5 + 100) / 2, (4.5 + 100) / 2]]))
    # 4x2 image, patch 2: 2 rows of 1 patch -> token i = row i
    tall = torch.arange(8.0).reshape(1, 1, 4, 2)
    torch.testing.assert_close(patchify_loss(tall, 2), torch.tensor([[1.5, 5.5]]))
    # rectangular patches
    torch.testing.assert_close(patchify_loss(c0, (1, 2)), torch.tensor([[0.5, 2.5, 4.5, 6.5]]))


def test_patchify_loss_row_major_index_mapping():
    b, c, h, w, p = 2, 3, 6, 8, 2
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(0))
    got = patchify_loss(x, p)
    gw = w // p
    for i in range(got.shape[1]):
        r, col = i // gw, i % gw
        torch.testing.assert_close(got[:, i], x[:, :, r * p : (r + 1) * p, col * p : (col + 1) * p].mean(dim=(1, 2, 3)))


def test_patchify_layout_and_token_order():
    x = torch.arange(2 * 4 * 4.0).reshape(1, 2, 4, 4)
    pt = patchify(x, 2)
    assert pt.shape == (1, 4, 8)
    # token 1 = row 0, col 1; features ordered (row in patch, col in patch, channel)
    expected = torch.tensor([2.0, 18.0, 3.0, 19.0, 6.0, 22.0, 7.0, 23.0])
    torch.testing.assert_close(pt[0, 1], expected)
    order = torch.tensor([3, 2, 1, 0])
    torch.testing.assert_close(patchify(x, 2, token_order=order), pt[:, [3, 2, 1, 0]])
    pl = patchify_loss(x, 2)
    torch.testing.assert_close(patchify_loss(x, 2, token_order=[1, 0, 3, 2]), pl[:, [1, 0, 3, 2]])
    torch.testing.assert_close(patchify_loss(x, 2, token_order=lambda t: t.flip(1)), pl.flip(1))
    with pytest.raises(ValueError, match="token_order"):
        patchify_loss(x, 2, token_order=[0, 4])
    with pytest.raises(ValueError, match="token_order"):
        patchify_loss(x, 2, token_order=torch.zeros(2, 2, dtype=torch.long))


def test_patchify_errors_name_the_argument():
    x = torch.zeros(1, 1, 5, 4)
    with pytest.raises(ValueError, match=r"patch_size=2 does not divide the height H=5 of per_element"):
        patchify_loss(x, 2)
    with pytest.raises(ValueError, match=r"patch_size=2 does not divide the width W=5"):
        patchify_loss(torch.zeros(1, 1, 4, 5), 2)
    with pytest.raises(ValueError, match="per_element"):
        patchify_loss(torch.zeros(4, 4), 2)
    with pytest.raises(ValueError, match="patch_size"):
        patchify_loss(torch.zeros(1, 1, 4, 4), 0)
    with pytest.raises(ValueError, match=r"patch_size=3 does not divide the height H=4 of x"):
        patchify(torch.zeros(1, 1, 4, 4), 3)


# ---------------------------------------------------------------------------
# tread_loss main term
# ---------------------------------------------------------------------------


def test_tread_loss_hand_values():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m1 = torch.tensor([[T, F, T, F]])  # kept 1, 3 -> 2
    m2 = torch.tensor([[F, F, F, T]])  # kept 4 -> 4
    assert tread_loss(per_token, [m1, m2]).item() == pytest.approx(3.0)
    assert tread_loss(per_token, [m1, m2], mode="plain").item() == pytest.approx(2.5)
    assert tread_loss(per_token, [m1]).item() == pytest.approx(2.0)
    assert tread_loss(per_token, []).item() == pytest.approx(2.5)  # no routes -> plain


def test_tread_loss_adapted_matches_manual_loop():
    g = torch.Generator().manual_seed(0)
    b, n, kept = 3, 16, 6
    per_token = torch.rand(b, n, generator=g)
    masks = []
    for _ in range(3):
        m = torch.zeros(b, n, dtype=torch.bool)
        idx = torch.rand(b, n, generator=g).argsort(1)[:, :kept]
        m.scatter_(1, idx, True)
        masks.append(m)
    manual_routes = []
    for m in masks:
        per_sample = [sum(per_token[i, j].item() for j in range(n) if m[i, j]) / kept for i in range(b)]
        manual_routes.append(sum(per_sample) / b)
    manual = sum(manual_routes) / len(manual_routes)
    assert tread_loss(per_token, masks).item() == pytest.approx(manual, rel=1e-6)


def test_plain_and_adapted_coincide_for_all_true_masks():
    per_token = torch.rand(2, 9, generator=torch.Generator().manual_seed(1))
    masks = [torch.ones(2, 9, dtype=torch.bool)] * 2
    a = tread_loss(per_token, masks, mode="adapted")
    p = tread_loss(per_token, masks, mode="plain")
    torch.testing.assert_close(a, p)
    torch.testing.assert_close(a, per_token.mean())


def test_adapted_loss_gradient_only_on_kept_tokens():
    per_token = torch.rand(1, 4, requires_grad=True)
    m = torch.tensor([[T, F, T, F]])
    tread_loss(per_token, [m]).backward()
    torch.testing.assert_close(per_token.grad, torch.tensor([[0.5, 0.0, 0.5, 0.0]]))


def test_tread_loss_argument_checks():
    pt = torch.rand(2, 4)
    with pytest.raises(ValueError, match="mode"):
        tread_loss(pt, [], mode="v1")
    with pytest.raises(TypeError, match=r"kept_masks\[1\]"):
        tread_loss(pt, [torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 4)])
    with pytest.raises(ValueError, match=r"kept_masks\[0\] must have shape \(2, 4\)"):
        tread_loss(pt, [torch.ones(2, 5, dtype=torch.bool)])
    with pytest.raises(ValueError, match="per_token"):
        tread_loss(torch.rand(2, 4, 1), [])
    with pytest.raises(TypeError, match="kept_masks"):
        tread_loss(pt, torch.ones(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------
# MaskDiT term
# ---------------------------------------------------------------------------


def test_maskdit_term_hand_value_single_patch():
    noisy = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    pred = torch.zeros_like(noisy)
    # mean 2.5, unbiased var 5/3 -> normalised target (x - 2.5)/sqrt(5/3 + 1e-6)
    # error = mean(target^2) = (5 / 4) / (5/3 + 1e-6)
    expected = (5 / 4) / (5 / 3 + 1e-6)
    got = maskdit_term(pred, noisy, torch.tensor([[T]]), 2)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert maskdit_term(pred, noisy, torch.tensor([[F]]), 2).item() == 0.0
    # prediction equal to the normalised target -> 0
    tgt = (noisy - 2.5) / math.sqrt(5 / 3 + 1e-6)
    assert maskdit_term(tgt, noisy, torch.tensor([[T]]), 2).item() == pytest.approx(0.0, abs=1e-12)


def test_maskdit_term_matches_manual_on_routed_tokens():
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 3, 4, 4, generator=g)
    noisy = torch.randn(2, 3, 4, 4, generator=g)
    routed = torch.tensor([[T, F, F, T], [F, T, T, F]])
    p = 2
    vals = []
    for bi in range(2):
        for i in range(4):
            if not routed[bi, i]:
                continue
            r, c = i // 2, i % 2
            u = noisy[bi, :, r * p : (r + 1) * p, c * p : (c + 1) * p].flatten()
            tgt = (u - u.mean()) / torch.sqrt(u.var() + 1e-6)
            # same (C, p, p) flattening for prediction and target: elementwise pairs match
            q = pred[bi, :, r * p : (r + 1) * p, c * p : (c + 1) * p].flatten()
            vals.append(((q - tgt) ** 2).mean().item())
    manual = sum(vals) / len(vals)
    assert maskdit_term(pred, noisy, routed, p).item() == pytest.approx(manual, rel=1e-5)
    with pytest.raises(ValueError, match="routed_mask"):
        maskdit_term(pred, noisy, routed[:, :3], p)
    with pytest.raises(ValueError, match="noisy_input"):
        maskdit_term(pred, noisy[:, :2], routed, p)


def test_maskdit_target_is_detached():
    noisy = torch.randn(1, 1, 2, 2, requires_grad=True)
    pred = torch.randn(1, 1, 2, 2, requires_grad=True)
    maskdit_term(pred, noisy, torch.tensor([[T]]), 2).backward()
    assert noisy.grad is None and pred.grad is not None


def test_tread_loss_with_aux_term():
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(2, 1, 4, 4, generator=g)
    noisy = torch.randn(2, 1, 4, 4, generator=g)
    per_token = torch.rand(2, 4, generator=g)
    m1 = torch.tensor([[T, F, T, F], [F, T, F, T]])
    m2 = torch.tensor([[T, T, F, F], [F, F, T, T]])
    main = tread_loss(per_token, [m1, m2])
    aux = (maskdit_term(pred, noisy, ~m1, 2) + maskdit_term(pred, noisy, ~m2, 2)) / 2
    got = tread_loss(per_token, [m1, m2], prediction=pred, noisy_input=noisy, patch_size=2)
    torch.testing.assert_close(got, main + 0.1 * aux)
    got_w = tread_loss(per_token, [m1, m2], aux_weight=0.5, prediction=pred, noisy_input=noisy, patch_size=2)
    torch.testing.assert_close(got_w, main + 0.5 * aux)
    off = tread_loss(per_token, [m1, m2], aux_weight=0.0, prediction=pred, noisy_input=noisy, patch_size=2)
    torch.testing.assert_close(off, main)
    plain = tread_loss(per_token, [m1, m2], mode="plain", prediction=pred, noisy_input=noisy, patch_size=2)
    torch.testing.assert_close(plain, per_token.mean() + 0.1 * aux)
    # no routes: no aux term
    torch.testing.assert_close(
        tread_loss(per_token, [], prediction=pred, noisy_input=noisy, patch_size=2), per_token.mean()
    )
    # callable form: called once per route with the ROUTED mask
    seen = []

    def aux_fn(routed):
        seen.append(routed)
        return routed.float().sum()

    got_fn = tread_loss(per_token, [m1, m2], aux_fn=aux_fn)
    assert len(seen) == 2 and torch.equal(seen[0], ~m1) and torch.equal(seen[1], ~m2)
    torch.testing.assert_close(got_fn, main + 0.1 * torch.tensor(4.0))
    with pytest.raises(ValueError, match="noisy_input"):
        tread_loss(per_token, [m1], prediction=pred, patch_size=2)
    with pytest.raises(ValueError, match="aux_fn"):
        tread_loss(per_token, [m1], aux_fn=aux_fn, prediction=pred, noisy_input=noisy, patch_size=2)


def test_end_to_end_with_edm_terms():
    from tread_fx.diffusion import EDM

    conv = torch.nn.Conv2d(2, 2, 1)
    x0 = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    terms = EDM().loss(lambda a, c: conv(a), x0, generator=torch.Generator().manual_seed(1), reduction="none")
    per_token = patchify_loss(terms.loss_per_element, 2)
    kept = torch.tensor([[T, F, T, T], [F, T, T, T]])
    loss = tread_loss(per_token, [kept], prediction=terms.prediction, noisy_input=terms.noisy_input, patch_size=2)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert conv.weight.grad is not None
