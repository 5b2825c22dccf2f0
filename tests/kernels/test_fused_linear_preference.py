"""fused_linear_preference_loss: the LM head + preference loss without logits,
against eager float64 (materialised logits, log-softmax, the DPO formula written
out here), for both backends (Triton under the interpreter on CPU), both
layouts, both ways of giving the reference, and the gradients of hidden,
weight and bias."""
import pytest
import torch
import torch.nn.functional as F

from tpo.kernels import FusedLinearPreferenceLoss, fused_linear_preference_loss
from tpo.kernels.fused_linear_logprob import reference_linear_logprob
from tpo.registry import build_loss

BACKENDS = ["torch", "triton"]
# (backend, strategy): pairwise runs on the torch backend; recompute on both
PATHS = [("torch", "pairwise"), ("torch", "recompute"), ("triton", "recompute")]
TRL_METRICS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"}


def _problem(pairs=3, T=9, H=21, V=67, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, T, H, generator=gen, dtype=torch.float64)
    ref_hidden = hidden + 0.3 * torch.randn(2 * pairs, T, H, generator=gen, dtype=torch.float64)
    weight = 0.4 * torch.randn(V, H, generator=gen, dtype=torch.float64)
    ref_weight = weight + 0.05 * torch.randn(V, H, generator=gen, dtype=torch.float64)
    bias = torch.randn(V, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (2 * pairs, T), generator=gen)
    for i in range(2 * pairs):  # prompt (masked) of varying length, right padding
        labels[i, : 2 + i % 3] = -100
        labels[i, T - (i % 2) * 2:] = -100
    to = dict(dtype=dtype, device=device)
    return (hidden.to(**to), ref_hidden.to(**to), weight.to(**to), ref_weight.to(**to), bias.to(**to),
            labels.to(device))


def _eager_dpo(hidden, weight, bias, labels, ref_hidden, ref_weight, beta):
    """DPO sigmoid from materialised logits."""
    logps = reference_linear_logprob(hidden, weight, labels, bias).logps
    with torch.no_grad():
        ref = reference_linear_logprob(ref_hidden, ref_weight, labels, None).logps
    b = hidden.shape[0] // 2
    d = (logps[:b] - ref[:b]) - (logps[b:] - ref[b:])
    return -F.logsigmoid(beta * d).mean(), logps, ref


def _leaves(*tensors):
    return [x.detach().clone().requires_grad_(True) for x in tensors]


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _assert_bounded(name, fused, eager, ref, factor=4.0):
    err_f, err_e = _max_err(fused, ref), _max_err(eager, ref)
    floor = 2.0 ** -21 * max(1.0, ref.double().abs().max().item())
    assert err_f <= factor * err_e + floor, f"{name}: fused error {err_f:.3e} vs eager fp32 error {err_e:.3e}"


@pytest.mark.parametrize("backend,strategy", PATHS)
def test_dpo_with_reference_model_matches_float64(backend, strategy):
    hidden, ref_hidden, weight, ref_weight, bias, labels = _problem()
    beta = 0.7

    h, w, b = _leaves(hidden, weight, bias)
    loss, metrics = fused_linear_preference_loss(
        h, w, labels, b, loss=dict(type="DPOLoss", beta=beta), ref_hidden=ref_hidden, ref_weight=ref_weight,
        backend=backend, strategy=strategy,
    )
    loss.backward()

    eager = {}
    for key, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        he, we, be = _leaves(hidden.to(dtype), weight.to(dtype), bias.to(dtype))
        value, logps, ref = _eager_dpo(he, we, be, labels, ref_hidden.to(dtype), ref_weight.to(dtype), beta)
        value.backward()
        eager[key] = (value, he.grad, we.grad, be.grad, logps, ref)

    for i, (name, got) in enumerate((("loss", loss), ("d_hidden", h.grad), ("d_weight", w.grad), ("d_bias", b.grad))):
        _assert_bounded(name, got, eager["fp32"][i], eager["fp64"][i])
    logps64, ref64 = eager["fp64"][4], eager["fp64"][5]
    assert TRL_METRICS <= set(metrics)
    assert all(not v.requires_grad for v in metrics.values())
    torch.testing.assert_close(metrics["logps/chosen"].double(), logps64[:3].mean(), rtol=1e-5, atol=1e-5)
    rewards_c = beta * (logps64[:3] - ref64[:3])
    rewards_r = beta * (logps64[3:] - ref64[3:])
    torch.testing.assert_close(metrics["rewards/margins"].double(), (rewards_c - rewards_r).mean(), rtol=1e-5, atol=1e-5)
    assert metrics["rewards/accuracies"].item() == pytest.approx((rewards_c > rewards_r).double().mean().item())
    # TRL's logits/chosen: the mean raw logit over completion tokens and vocabulary
    logits = hidden.double() @ weight.double().t() + bias.double()
    mask = labels[:3] != -100
    torch.testing.assert_close(metrics["logits/chosen"].double(), logits[:3][mask].mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,strategy", PATHS)
def test_separate_layouts_and_precomputed_reference(backend, strategy):
    hidden, ref_hidden, weight, ref_weight, bias, labels = _problem(pairs=2, T=8, seed=1)
    rej_hidden = hidden[2:, :6].contiguous()  # rejected completions are shorter
    rej_labels = labels[2:, :6].contiguous()
    with torch.no_grad():
        ref_c = reference_linear_logprob(ref_hidden[:2].double(), ref_weight.double(), labels[:2]).logps
        ref_r = reference_linear_logprob(ref_hidden[2:, :6].double(), ref_weight.double(), rej_labels).logps
    h_c, h_r, w = _leaves(hidden[:2], rej_hidden, weight)
    loss, _ = fused_linear_preference_loss(
        h_c, w, labels[:2], rejected_hidden=h_r, rejected_labels=rej_labels,
        ref_chosen_logps=ref_c.float(), ref_rejected_logps=ref_r.float(),
        loss=dict(type="DPOLoss", loss_type="ipo", beta=0.5), backend=backend, strategy=strategy,
    )
    loss.backward()

    e_c, e_r, e_w = _leaves(hidden[:2].double(), rej_hidden.double(), weight.double())
    out_c = reference_linear_logprob(e_c, e_w, labels[:2])
    out_r = reference_linear_logprob(e_r, e_w, rej_labels)
    lc = (out_c.logps - ref_c) / out_c.counts
    lr = (out_r.logps - ref_r) / out_r.counts
    expected = ((lc - lr - 1 / (2 * 0.5)) ** 2).mean()
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for got, want in ((h_c.grad, e_c.grad), (h_r.grad, e_r.grad), (w.grad, e_w.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "loss_cfg",
    [
        dict(type="SimPOLoss", beta=2.0, gamma=0.3),
        dict(type="CPOLoss", loss_type="sigmoid", cpo_alpha=1.0),
        dict(type="ORPOLoss", beta=0.2),
        dict(type="DPOLoss", loss_type="sigmoid_norm", beta=0.5),
        dict(type="DPOLoss", loss_type=["sigmoid", "sft"], rpo_alpha=0.5),
        dict(type="CombinedPreferenceLoss", losses=[dict(type="DPOLoss"), dict(type="SimPOLoss")], weights=[1, 0.5]),
    ],
    ids=lambda c: c["type"] + "-" + str(c.get("loss_type", "")),
)
def test_any_registered_loss_gets_the_right_logps_and_lengths(loss_cfg):
    hidden, ref_hidden, weight, ref_weight, bias, labels = _problem(seed=2)
    labels[1, :] = -100  # a chosen completion with no tokens at all
    h, w = _leaves(hidden, weight)
    loss, metrics = fused_linear_preference_loss(h, w, labels, bias, loss=loss_cfg, ref_hidden=ref_hidden,
                                                 ref_weight=ref_weight, backend="torch")
    loss.backward()
    # the same loss module fed with eager float64 per-sequence sums and counts
    he, we = _leaves(hidden.double(), weight.double())
    pol = reference_linear_logprob(he, we, labels, bias.double())
    ref = reference_linear_logprob(ref_hidden.double(), ref_weight.double(), labels)
    module = build_loss(loss_cfg)
    out = module(pol.logps[:3], pol.logps[3:], ref.logps[:3], ref.logps[3:],
                 chosen_lengths=pol.counts[:3].double(), rejected_lengths=pol.counts[3:].double())
    out["loss"].backward()
    torch.testing.assert_close(loss.double(), out["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), he.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), we.grad, rtol=1e-4, atol=1e-6)
    for key in out:
        assert key in metrics


def test_strategies_agree_and_auto_picks_by_loss_and_memory(monkeypatch):
    import tpo.kernels.fused_linear_preference as module

    hidden, ref_hidden, weight, ref_weight, bias, labels = _problem(seed=6)
    calls = []
    original = module.torch_logprob_grad_pass
    monkeypatch.setattr(module, "torch_logprob_grad_pass", lambda *a, **k: calls.append(1) or original(*a, **k))
    results = {}
    for strategy in ("pairwise", "recompute", "auto"):
        h, w, b = _leaves(hidden, weight, bias)
        loss, metrics = fused_linear_preference_loss(h, w, labels, b, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                                     backend="torch", strategy=strategy)
        loss.backward()
        results[strategy] = (loss, h.grad, w.grad, b.grad, metrics)
    assert len(calls) == 2  # pairwise, and auto for a separable loss on the torch backend
    for a, b in zip(results["pairwise"][:4], results["recompute"][:4]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert set(results["pairwise"][4]) == set(results["recompute"][4])
    calls.clear()
    fused_linear_preference_loss(hidden, weight, labels, loss=dict(type="DPOLoss", loss_type="aot"),
                                 ref_hidden=ref_hidden, backend="torch")
    assert not calls  # aot sorts across the batch: not pair-separable
    monkeypatch.setattr(module, "_PAIR_MAX_ELEMENTS", 10)
    fused_linear_preference_loss(hidden, weight, labels, ref_hidden=ref_hidden, backend="torch")
    assert not calls  # one pair's logits would exceed the cap: recompute instead
    with pytest.raises(ValueError, match="needs a pair-separable loss"):
        fused_linear_preference_loss(hidden, weight, labels, loss=dict(type="ORPOLoss"), strategy="pairwise")


def test_pairwise_detects_a_loss_that_is_not_separable():
    from tpo.losses.preference import DPOLoss

    class MislabelledAOT(DPOLoss):  # sorts across the batch, yet claims pair separability
        pair_separable = True

    hidden, _, weight, _, _, labels = _problem(seed=7)
    policy = reference_linear_logprob(hidden, weight, labels).logps
    margins = policy[:3] - policy[3:]
    # reference margins ranked opposite to the policy's, so sorting re-pairs them
    ref_margins = torch.empty(3)
    ref_margins[margins.argsort()] = torch.tensor([30.0, 0.0, -30.0])
    with pytest.raises(RuntimeError, match="says it is pair-separable"):
        fused_linear_preference_loss(hidden.requires_grad_(True), weight, labels, ref_chosen_logps=ref_margins,
                                     ref_rejected_logps=torch.zeros(3), loss=MislabelledAOT(loss_type="aot", beta=0.1),
                                     strategy="pairwise")


def test_reference_gets_no_gradient_and_defaults_to_the_policy_head():
    hidden, ref_hidden, weight, _, bias, labels = _problem(seed=3)
    h, rh, w, b = _leaves(hidden, ref_hidden, weight, bias)
    loss, _ = fused_linear_preference_loss(h, w, labels, b, ref_hidden=rh, backend="torch")
    loss.backward()
    assert rh.grad is None and h.grad is not None
    with torch.no_grad():
        ref = reference_linear_logprob(ref_hidden.double(), weight.double(), labels, bias.double()).logps
        pol = reference_linear_logprob(hidden.double(), weight.double(), labels, bias.double()).logps
    expected = -F.logsigmoid(0.1 * ((pol[:3] - ref[:3]) - (pol[3:] - ref[3:]))).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_kto_through_loss_kwargs():
    hidden, ref_hidden, weight, ref_weight, _, labels = _problem(seed=4)
    kl = dict(kl_logps=torch.tensor([-20.0, -25.0]), ref_kl_logps=torch.tensor([-21.0, -25.5]))
    loss, metrics = fused_linear_preference_loss(
        hidden[:4], weight, labels[:4], rejected_hidden=hidden[4:], rejected_labels=labels[4:],
        ref_hidden=ref_hidden[:4], ref_rejected_hidden=ref_hidden[4:], ref_weight=ref_weight,
        loss=dict(type="KTOLoss", beta=0.3), loss_kwargs=kl, backend="torch",
    )
    assert metrics["kl"].item() == pytest.approx(0.75)
    assert metrics["count/chosen"].item() == 4 and metrics["count/rejected"].item() == 2
    assert torch.isfinite(loss)


def test_module_keeps_stateful_loss_between_calls():
    hidden, ref_hidden, weight, ref_weight, _, labels = _problem(seed=5)
    loss_fn = FusedLinearPreferenceLoss(loss=dict(type="DPOLoss", loss_type="bco_pair"), backend="torch")
    assert loss_fn.needs_reference
    for _ in range(2):
        loss_fn(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
    assert loss_fn.loss.bco_running_count.item() == 2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(odd=True), ValueError, "odd batch"),
        (dict(no_reference=True), ValueError, "needs a reference"),
        (dict(both_references=True), ValueError, "not both"),
        (dict(rejected_labels_only=True), ValueError, "rejected_labels given without rejected_hidden"),
        (dict(ref_layout=True), ValueError, "drop ref_rejected_hidden"),
        (dict(loss=dict(type="L1Loss")), TypeError, "must be a preference loss"),
        (dict(loss=dict(type="DPOLoss", beta=-1.0)), ValueError, "loss.beta"),
        (dict(flat=True), ValueError, r"hidden must be \[batch, T, H\]"),
        (dict(ref_shape=True), ValueError, "must match the policy's"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    hidden, ref_hidden, weight, _, _, labels = _problem(pairs=2, T=5, H=8, V=20)
    call = dict(loss=kwargs.get("loss"), ref_hidden=ref_hidden, backend="torch")
    h, y = hidden, labels
    if kwargs.get("odd"):
        h, y, call["ref_hidden"] = hidden[:3], labels[:3], ref_hidden[:3]
    if kwargs.get("no_reference"):
        call.pop("ref_hidden")
    if kwargs.get("both_references"):
        call.update(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    if kwargs.get("rejected_labels_only"):
        call["rejected_labels"] = labels
    if kwargs.get("ref_layout"):
        call["ref_rejected_hidden"] = ref_hidden
    if kwargs.get("flat"):
        h, y = hidden.reshape(-1, 8), labels.reshape(-1)
    if kwargs.get("ref_shape"):
        call["ref_hidden"] = ref_hidden[:, :4]
    with pytest.raises(error, match=match):
        fused_linear_preference_loss(h, weight, y, **call)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_bf16_dpo_with_reference(backend):
    hidden, ref_hidden, weight, ref_weight, bias, labels = _problem(pairs=4, T=512, H=1024, V=32003, device="cuda")
    weight, ref_weight = weight * 0.05, ref_weight * 0.05
    beta = 0.1
    results = {}
    for key, dtype in (("bf16", torch.bfloat16), ("fp64", torch.float64)):
        he, we, be = _leaves(hidden.to(dtype), weight.to(dtype), bias.to(dtype))
        value, _, _ = _eager_dpo(he, we, be, labels, ref_hidden.to(dtype), ref_weight.to(dtype), beta)
        value.backward()
        results[key] = (value, he.grad, we.grad, be.grad)
    h, w, b = _leaves(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16())
    loss, _ = fused_linear_preference_loss(h, w, labels, b, loss=dict(type="DPOLoss", beta=beta),
                                           ref_hidden=ref_hidden.bfloat16(), ref_weight=ref_weight.bfloat16(),
                                           backend=backend)
    loss.backward()
    for i, (name, got) in enumerate((("loss", loss), ("d_hidden", h.grad), ("d_weight", w.grad), ("d_bias", b.grad))):
        _assert_bounded(name, got, results["bf16"][i], results["fp64"][i], factor=2.0)
