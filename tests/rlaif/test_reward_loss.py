"""BradleyTerryLoss against a float64 reference of VLM-RLAIF's loss."""
import pytest
import torch
from tpo.registry import build_loss


def reference(c, r, coef, mode="abs", ls=0.0, margin=None):
    c, r = c.double(), r.double()
    d = c - r if margin is None else c - r - margin.double()
    bt = (-(1 - ls) * torch.nn.functional.logsigmoid(d) - ls * torch.nn.functional.logsigmoid(-d)).mean()
    s = c + r
    return bt + coef * (s.mean().abs() if mode == "abs" else (s * s).mean())


@pytest.mark.parametrize("mode", ["abs", "square"])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_matches_reference_and_gradients(mode, ls):
    torch.manual_seed(1)
    c = torch.randn(7, dtype=torch.float64, requires_grad=True)
    r = torch.randn(7, dtype=torch.float64, requires_grad=True)
    loss_fn = build_loss(dict(type="BradleyTerryLoss", center_coef=0.3, center=mode, label_smoothing=ls))
    out = loss_fn(c, r)
    ref = reference(c, r, 0.3, mode, ls)
    torch.testing.assert_close(out["loss"].double(), ref)
    g = torch.autograd.grad(out["loss"], (c, r))
    g_ref = torch.autograd.grad(ref, (c, r))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    diff = (c - r).detach()
    assert out["rewards/accuracies"] == pytest.approx(float((diff > 0).double().mean()))
    assert out["rewards/margins"] == pytest.approx(float(diff.mean()))


def test_centring_term_pulls_rewards_to_zero_and_is_small_by_default():
    loss_fn = build_loss(dict(type="BradleyTerryLoss"))
    assert loss_fn.center_coef == 1e-3  # the paper's weight
    c = torch.tensor([5.0, 6.0], requires_grad=True)
    r = torch.tensor([4.0, 5.0], requires_grad=True)
    out = loss_fn(c, r)
    assert out["loss/center"] == pytest.approx(10.0)
    (gc,) = torch.autograd.grad(out["loss"], c)
    # without the centring term the gradient on a shift of all rewards is zero; with it, positive
    shifted = build_loss(dict(type="BradleyTerryLoss", center_coef=0.0))(c, r)["loss"]
    (g0,) = torch.autograd.grad(shifted, c)
    assert float((gc - g0).sum()) == pytest.approx(1e-3, rel=1e-4)


def test_margin_and_ties():
    loss_fn = build_loss(dict(type="BradleyTerryLoss", center_coef=0.0))
    c, r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    out = loss_fn(c, r, margin=torch.tensor([1.0, 0.0]))
    assert float(out["loss"]) == pytest.approx(float(-torch.nn.functional.logsigmoid(torch.tensor(0.0))))
    assert float(out["rewards/accuracies"]) == pytest.approx(0.75)  # a tie counts half


@pytest.mark.parametrize("cfg, match", [
    (dict(center_coef=-1), "center_coef"),
    (dict(center="l2"), "center"),
    (dict(label_smoothing=0.5), "label_smoothing"),
])
def test_bad_arguments(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_loss(dict(type="BradleyTerryLoss", **cfg))


def test_bad_shapes():
    loss_fn = build_loss(dict(type="BradleyTerryLoss"))
    with pytest.raises(ValueError, match="equal, non-empty"):
        loss_fn(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="equal, non-empty"):
        loss_fn(torch.zeros(0), torch.zeros(0))
