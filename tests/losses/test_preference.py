"""Preference losses against values computed by hand in this file: small
explicit numbers, scalar ``math`` formulas written out per pair (independent of
the tensor code under test), TRL's definitions."""
import math

import pytest
import torch

from tpo.losses.preference import (
    DPO_LOSS_TYPES,
    CPOLoss,
    DPOLoss,
    KTOLoss,
    ORPOLoss,
    SimPOLoss,
)
from tpo.registry import build_loss

# Two pairs. Policy and reference per-sequence summed log-probs, completion lengths.
PC = [-10.0, -12.5]
PR = [-11.0, -12.0]
RC = [-10.5, -12.0]
RR = [-10.8, -12.2]
NC = [4.0, 5.0]
NR = [3.0, 6.0]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def call(loss, **overrides):
    args = dict(chosen_logps=t(PC), rejected_logps=t(PR), ref_chosen_logps=t(RC), ref_rejected_logps=t(RR),
                chosen_lengths=t(NC), rejected_lengths=t(NR))
    args.update(overrides)
    return loss(**args)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


def mean(xs):
    return sum(xs) / len(xs)


def pairs():
    """(chosen log-ratio, rejected log-ratio, policy logps, reference logps, lengths) per pair."""
    for pc, pr, rc, rr, nc, nr in zip(PC, PR, RC, RR, NC, NR):
        yield pc - rc, pr - rr, pc, pr, rc, rr, nc, nr


def hand_dpo(kind, beta, ls=0.0, tau=0.05):
    per_pair = []
    for lc, lr, pc, pr, rc, rr, nc, nr in pairs():
        d = lc - lr
        if kind in ("aot", "aot_unpaired"):
            continue  # pairs the sorted ratios, below
        if kind == "sigmoid":
            v = -(1 - ls) * logsig(beta * d) - ls * logsig(-beta * d)
        elif kind == "hinge":
            v = max(0.0, 1 - beta * d)
        elif kind == "ipo":
            v = (lc / nc - lr / nr - 1 / (2 * beta)) ** 2
        elif kind == "exo_pair":
            eps = ls if ls > 0 else 1e-3
            v = sig(beta * d) * (logsig(beta * d) - math.log(1 - eps)) + sig(-beta * d) * (logsig(-beta * d) - math.log(eps))
        elif kind == "nca_pair":
            v = -logsig(beta * lc) - 0.5 * logsig(-beta * lc) - 0.5 * logsig(-beta * lr)
        elif kind == "robust":
            v = (-(1 - ls) * logsig(beta * d) + ls * logsig(-beta * d)) / (1 - 2 * ls)
        elif kind == "sppo_hard":
            v = (lc - 0.5 / beta) ** 2 + (lr + 0.5 / beta) ** 2
        elif kind == "apo_zero":
            v = 1 - sig(beta * lc) + sig(beta * lr)
        elif kind == "apo_down":
            v = sig(beta * lc) + 1 - sig(beta * d)
        elif kind == "discopop":
            x = beta * d
            m = sig(x / tau)
            v = -logsig(x) * (1 - m) + math.exp(-x) * m
        elif kind == "sigmoid_norm":
            v = -logsig(beta * (lc / nc - lr / nr))
        elif kind == "sft":
            v = -sum(PC) / sum(NC)
        elif kind == "bco_pair":
            delta = mean([beta * (a - b) for a, b in zip(PC, RC)] + [beta * (a - b) for a, b in zip(PR, RR)])
            v = -logsig(beta * lc - delta) - logsig(-(beta * lr - delta))
        else:
            raise KeyError(kind)
        per_pair.append(v)
    if kind in ("aot", "aot_unpaired"):
        if kind == "aot":
            a = sorted(p - q for p, q in zip(PC, PR))
            b = sorted(p - q for p, q in zip(RC, RR))
        else:
            a = sorted(p - q for p, q in zip(PC, RC))
            b = sorted(p - q for p, q in zip(PR, RR))
        per_pair = [-(1 - ls) * logsig(beta * (x - y)) - ls * logsig(-beta * (x - y)) for x, y in zip(a, b)]
    return mean(per_pair)


def test_sigmoid_by_hand_literal():
    # pair 1: l_c = 0.5, l_r = -0.2, d = 0.7; pair 2: l_c = -0.5, l_r = 0.2, d = -0.7; beta = 0.5
    # loss = (log(1 + e^-0.35) + log(1 + e^0.35)) / 2 = (0.5333822 + 0.8833822) / 2
    out = call(DPOLoss(beta=0.5))
    assert out["loss"].item() == pytest.approx((0.5333822 + 0.8833822) / 2, abs=1e-6)
    assert out["rewards/chosen"].item() == pytest.approx(0.0, abs=1e-12)  # (0.25 - 0.25) / 2
    assert out["rewards/rejected"].item() == pytest.approx(0.0, abs=1e-12)
    assert out["rewards/accuracies"].item() == 0.5  # 0.25 > -0.1, -0.25 < 0.1
    assert out["rewards/margins"].item() == pytest.approx(0.0, abs=1e-12)
    assert out["logps/chosen"].item() == pytest.approx(-11.25)
    assert out["logps/rejected"].item() == pytest.approx(-11.5)


@pytest.mark.parametrize("kind", [k for k in DPO_LOSS_TYPES])
@pytest.mark.parametrize("beta,ls", [(0.5, 0.0), (2.0, 0.2)])
def test_every_dpo_loss_type_by_hand(kind, beta, ls):
    loss = DPOLoss(loss_type=kind, beta=beta, label_smoothing=ls)
    out = call(loss)
    expected = hand_dpo(kind, beta, ls)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    rewards_c = [beta * (a - b) for a, b in zip(PC, RC)]
    rewards_r = [beta * (a - b) for a, b in zip(PR, RR)]
    assert out["rewards/chosen"].item() == pytest.approx(mean(rewards_c), abs=1e-12)
    assert out["rewards/rejected"].item() == pytest.approx(mean(rewards_r), abs=1e-12)
    assert out["rewards/margins"].item() == pytest.approx(mean(rewards_c) - mean(rewards_r), abs=1e-12)
    assert out["rewards/accuracies"].item() == mean([float(a > b) for a, b in zip(rewards_c, rewards_r)])
    if kind == "sft":
        assert out["nll_loss"].item() == pytest.approx(22.5 / 9)


def test_dpo_gradient_by_hand():
    # d/d pc_i of mean_i -logsig(beta d_i) = -beta * sig(-beta d_i) / B
    beta = 0.5
    pc = t(PC).requires_grad_(True)
    pr = t(PR).requires_grad_(True)
    call(DPOLoss(beta=beta), chosen_logps=pc, rejected_logps=pr)["loss"].backward()
    for i, (lc, lr, *_rest) in enumerate(pairs()):
        g = -beta * sig(-beta * (lc - lr)) / 2
        assert pc.grad[i].item() == pytest.approx(g, rel=1e-9)
        assert pr.grad[i].item() == pytest.approx(-g, rel=1e-9)


def test_reference_is_never_differentiated():
    rc = t(RC).requires_grad_(True)
    pc = t(PC).requires_grad_(True)
    call(DPOLoss(), chosen_logps=pc, ref_chosen_logps=rc)["loss"].backward()
    assert rc.grad is None and pc.grad is not None


def test_reference_free_and_rpo_alpha():
    beta = 0.5
    out = call(DPOLoss(beta=beta, reference_free=True, rpo_alpha=0.3), ref_chosen_logps=None, ref_rejected_logps=None)
    dpo = mean([-logsig(beta * (pc - pr)) for pc, pr in zip(PC, PR)])
    nll = 22.5 / 9  # -(sum of chosen logps) / (chosen tokens)
    assert out["loss"].item() == pytest.approx(dpo + 0.3 * nll, rel=1e-9)
    assert out["nll_loss"].item() == pytest.approx(nll)
    assert out["rewards/chosen"].item() == pytest.approx(beta * mean(PC))


def test_several_loss_types_with_weights():
    beta = 0.5
    loss = DPOLoss(loss_type=["sigmoid", "sppo_hard", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=beta)
    out = call(loss)
    expected = 0.8 * hand_dpo("sigmoid", beta) + 0.2 * hand_dpo("sppo_hard", beta) + hand_dpo("sft", beta)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-9)
    assert out["loss/sppo_hard"].item() == pytest.approx(hand_dpo("sppo_hard", beta), rel=1e-9)


def test_aot_pair_is_an_alias_and_sorting_matters():
    a = call(DPOLoss(loss_type="aot_pair", beta=1.0))["loss"].item()
    b = call(DPOLoss(loss_type="aot_unpaired", beta=1.0))["loss"].item()
    assert a == b
    # sorting pairs chosen/rejected ratios differently than the paired sigmoid loss does
    assert a != pytest.approx(call(DPOLoss(loss_type="sigmoid", beta=1.0))["loss"].item())


def test_bco_running_mean_across_steps_and_eval():
    beta = 0.5
    loss = DPOLoss(loss_type="bco_pair", beta=beta)
    first = call(loss)["loss"].item()
    assert first == pytest.approx(hand_dpo("bco_pair", beta), rel=1e-9)
    batch1 = mean([beta * (a - b) for a, b in zip(PC, RC)] + [beta * (a - b) for a, b in zip(PR, RR)])
    # second batch: chosen shifted up by 1 -> its batch-mean reward moves by beta / 2
    pc2 = [x + 1.0 for x in PC]
    batch2 = batch1 + beta * 0.5
    delta = (batch1 + batch2) / 2  # running mean of the batch means
    second = call(loss, chosen_logps=t(pc2))["loss"].item()
    expected = mean([-logsig(beta * (p - rc) - delta) - logsig(-(beta * (q - rr) - delta))
                     for p, q, rc, rr in zip(pc2, PR, RC, RR)])
    assert second == pytest.approx(expected, rel=1e-9)
    loss.eval()  # eval does not move the running mean
    call(loss, chosen_logps=t([x + 50 for x in PC]))
    assert loss.bco_running_mean.item() == pytest.approx(delta)
    assert loss.bco_running_count.item() == 2


def test_simpo_by_hand():
    beta, gamma = 2.0, 0.5
    out = call(SimPOLoss(beta=beta, gamma=gamma, label_smoothing=0.1))
    per = []
    for pc, pr, nc, nr in zip(PC, PR, NC, NR):
        x = beta * (pc / nc - pr / nr) - gamma
        per.append(-0.9 * logsig(x) - 0.1 * logsig(-x))
    assert out["loss"].item() == pytest.approx(mean(per), rel=1e-9)
    assert out["rewards/chosen"].item() == pytest.approx(mean([beta * pc / nc for pc, nc in zip(PC, NC)]))
    assert out["logps/rejected"].item() == pytest.approx(mean([pr / nr for pr, nr in zip(PR, NR)]))
    with_sft = call(SimPOLoss(beta=beta, gamma=gamma, label_smoothing=0.1, sft_weight=2.0))["loss"].item()
    assert with_sft == pytest.approx(mean(per) + 2.0 * 22.5 / 9, rel=1e-9)


@pytest.mark.parametrize("kind", CPOLoss.LOSS_TYPES)
def test_cpo_by_hand(kind):
    beta, alpha, gamma = 0.5, 1.5, 0.3
    out = call(CPOLoss(beta=beta, loss_type=kind, cpo_alpha=alpha, simpo_gamma=gamma))
    per = []
    for pc, pr, nc, nr in zip(PC, PR, NC, NR):
        if kind in ("ipo", "simpo"):
            pc, pr = pc / nc, pr / nr
        x = pc - pr
        per.append({
            "sigmoid": -logsig(beta * x),
            "hinge": max(0.0, 1 - beta * x),
            "ipo": (x - 1 / (2 * beta)) ** 2,
            "simpo": -logsig(beta * x - gamma),
        }[kind])
    nll = 22.5 / 9
    assert out["loss"].item() == pytest.approx(mean(per) + alpha * nll, rel=1e-9)
    assert out["nll_loss"].item() == pytest.approx(nll)


def test_orpo_by_hand():
    beta = 0.25
    out = call(ORPOLoss(beta=beta))
    ratios, odds = [], []
    for pc, pr, nc, nr in zip(PC, PR, NC, NR):
        a, b = pc / nc, pr / nr
        log_odds = (a - b) - (math.log(1 - math.exp(a)) - math.log(1 - math.exp(b)))
        odds.append(log_odds)
        ratios.append(logsig(log_odds))
    nll = 22.5 / 9
    assert out["loss"].item() == pytest.approx(nll - beta * mean(ratios), rel=1e-9)
    assert out["log_odds_ratio"].item() == pytest.approx(mean(ratios), rel=1e-9)
    assert out["log_odds_chosen"].item() == pytest.approx(mean(odds), rel=1e-9)
    assert out["rewards/chosen"].item() == pytest.approx(beta * mean([p / n for p, n in zip(PC, NC)]))


def test_orpo_stays_finite_near_probability_one():
    out = ORPOLoss()(t([-1e-7, -1e-9]), t([-3.0, -2.0]), chosen_lengths=t([1.0, 1.0]), rejected_lengths=t([1.0, 1.0]))
    assert torch.isfinite(out["loss"])


def test_kto_by_hand_unpaired_with_kl():
    beta = 0.5
    chosen, ref_chosen = [-3.0, -4.0, -2.0], [-3.5, -3.0, -2.5]
    rejected, ref_rejected = [-6.0], [-5.0]
    kl_p, kl_r = [-8.0, -7.0], [-8.6, -7.2]
    kl = max(0.0, mean([a - b for a, b in zip(kl_p, kl_r)]))  # 0.4
    out = KTOLoss(beta=beta, desirable_weight=1.0, undesirable_weight=1.5)(
        t(chosen), t(rejected), t(ref_chosen), t(ref_rejected), kl_logps=t(kl_p), ref_kl_logps=t(kl_r))
    losses = [1 - sig(beta * ((c - r) - kl)) for c, r in zip(chosen, ref_chosen)]
    losses += [1.5 * (1 - sig(beta * (kl - (c - r)))) for c, r in zip(rejected, ref_rejected)]
    assert out["loss"].item() == pytest.approx(mean(losses), rel=1e-9)
    assert out["kl"].item() == pytest.approx(kl)
    assert out["rewards/chosen"].item() == pytest.approx(beta * mean([c - r for c, r in zip(chosen, ref_chosen)]))
    assert out["count/chosen"].item() == 3 and out["count/rejected"].item() == 1
    # no KL completions -> z = 0; negative KL estimates are clamped to 0
    no_kl = KTOLoss(beta=beta)(t(chosen), t(rejected), t(ref_chosen), t(ref_rejected))
    neg_kl = KTOLoss(beta=beta)(t(chosen), t(rejected), t(ref_chosen), t(ref_rejected),
                                kl_logps=t([-9.0]), ref_kl_logps=t([-8.0]))
    assert no_kl["kl"].item() == 0 and neg_kl["loss"].item() == pytest.approx(no_kl["loss"].item())


def test_kto_apo_zero_unpaired_and_one_sided_batch():
    beta = 0.5
    out = KTOLoss(beta=beta, loss_type="apo_zero_unpaired")(t([-3.0]), t([-6.0, -1.0]), t([-3.5]), t([-5.0, -2.0]))
    expected = mean([1 - sig(beta * 0.5), sig(beta * -1.0), sig(beta * 1.0)])
    assert out["loss"].item() == pytest.approx(expected, rel=1e-9)
    only_desirable = KTOLoss(beta=beta)(t([-3.0]), t([]), t([-3.5]), t([]))
    assert "rewards/rejected" not in only_desirable and only_desirable["count/rejected"].item() == 0
    assert only_desirable["loss"].item() == pytest.approx(1 - sig(beta * 0.5))


def test_combined_from_config():
    loss = build_loss(dict(
        type="CombinedPreferenceLoss",
        losses=[dict(type="DPOLoss", beta=0.5), dict(type="SimPOLoss", beta=2.0, gamma=0.5)],
        weights=[1.0, 0.25],
    ))
    out = call(loss)
    simpo = mean([-logsig(2.0 * (pc / nc - pr / nr) - 0.5) for pc, pr, nc, nr in zip(PC, PR, NC, NR)])
    assert out["loss"].item() == pytest.approx(hand_dpo("sigmoid", 0.5) + 0.25 * simpo, rel=1e-9)
    assert out["loss/simpo"].item() == pytest.approx(simpo, rel=1e-9)
    assert out["rewards/chosen"] is out["dpo/rewards/chosen"]  # the first part's TRL names stay unprefixed
    assert "simpo/rewards/chosen" in out and loss.needs_reference


def test_registry_builds_each_loss_with_its_arguments():
    for cfg in (dict(type="DPOLoss", loss_type="ipo", beta=0.3), dict(type="SimPOLoss"), dict(type="CPOLoss"),
                dict(type="ORPOLoss"), dict(type="KTOLoss")):
        module = build_loss(cfg)
        assert type(module).__name__ == cfg["type"]
    assert build_loss(dict(type="DPOLoss", loss_type="ipo", beta=0.3)).beta == 0.3
    assert not build_loss(dict(type="SimPOLoss")).needs_reference


@pytest.mark.parametrize(
    "build, call_kwargs, error, match",
    [
        (dict(type="DPOLoss", loss_type="sigmod"), None, ValueError, "loss.loss_type: unknown DPO loss type 'sigmod'"),
        (dict(type="DPOLoss", beta=0.0), None, ValueError, "loss.beta: must be a finite number > 0"),
        (dict(type="DPOLoss", loss_type="robust", label_smoothing=0.5), None, ValueError, "robust"),
        (dict(type="DPOLoss", loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), None, ValueError, "one weight per loss"),
        (dict(type="DPOLoss", lossweights=[1.0]), None, TypeError, "did you mean 'loss_weights'"),
        (dict(type="CPOLoss", loss_type="dpo"), None, ValueError, "CPOLoss loss_type must be one of"),
        (dict(type="DPOLoss"), dict(ref_chosen_logps=None), ValueError, "needs the reference log-probs"),
        (dict(type="DPOLoss", loss_type="ipo"), dict(chosen_lengths=None), ValueError, "needs chosen_lengths"),
        (dict(type="SimPOLoss"), dict(rejected_lengths=None), ValueError, "needs rejected_lengths"),
        (dict(type="DPOLoss"), dict(rejected_logps=t([-1.0])), ValueError, "must have the same shape"),
        (dict(type="DPOLoss"), dict(chosen_logps=t([[-1.0, -2.0]])), ValueError, r"must be 1-D \[batch\]"),
        (dict(type="KTOLoss"), dict(kl_logps=t([-1.0])), ValueError, "pass both kl_logps and ref_kl_logps"),
    ],
)
def test_bad_configs_and_inputs_are_named(build, call_kwargs, error, match):
    with pytest.raises(error, match=match):
        loss = build_loss(build)
        call(loss, **(call_kwargs or {}))


def test_low_precision_inputs_are_upcast():
    out = DPOLoss(beta=0.5)(t(PC).bfloat16(), t(PR).bfloat16(), t(RC).bfloat16(), t(RR).bfloat16())
    assert out["loss"].dtype == torch.float32


def test_aot_sorts_policy_and_reference_margins_separately():
    # policy margins [2, -1, 0.5] and reference margins [0.1, 0.9, -0.4]: sorted, they pair as
    # (-1, -0.4), (0.5, 0.1), (2, 0.9) -> deltas [-0.6, 0.4, 1.1] (unsorted they would be [1.9, -1.9, 0.9])
    beta = 1.0
    out = DPOLoss(loss_type="aot", beta=beta)(t([0.0, -1.0, 0.5]), t([-2.0, 0.0, 0.0]), t([0.1, 0.9, -0.4]), t([0.0, 0.0, 0.0]))
    assert out["loss"].item() == pytest.approx(mean([-logsig(beta * x) for x in (-0.6, 0.4, 1.1)]), rel=1e-9)
