"""PPO: GAE and the helpers against plain references, one rollout's shaping
(KL penalty, the paper's penalties), the epochs over each batch of rollouts,
the initial LoRA policy with its adapters off as the reference, and exact resume through the engine."""
import copy
import json

import pytest
import torch
from rlaif_testkit import NUM_FRAMES, PPO_CONFIG, QUIET, policy_config, reward_model_config, save_weights
from tpo.registry import build_algorithm, build_model

from tpo.algorithms.ppo import PPO, gae, masked_whiten, truncate_after_eos


def test_gae_matches_the_definition():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    lengths = [5, 3, 1]
    mask = torch.zeros(3, 5, dtype=torch.float64)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        for t in range(5):
            if t >= n:
                assert adv[b, t] == 0 and ret[b, t] == 0
                continue
            want = 0.0
            for k in range(t, n):  # sum_k (gamma lam)^(k-t) delta_k, V after the end = 0
                nxt = values[b, k + 1] if k + 1 < n else 0.0
                want += (gamma * lam) ** (k - t) * (rewards[b, k] + gamma * nxt - values[b, k])
            assert float(adv[b, t]) == pytest.approx(float(want))
            assert float(ret[b, t]) == pytest.approx(float(want + values[b, t]))


def test_truncate_after_eos_and_whiten():
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    out, mask, has = truncate_after_eos(tokens, eos_id=2, pad_id=0)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has.tolist() == [True, False, True]
    x = torch.randn(3, 4)
    w = masked_whiten(x, mask.float())
    kept = w[mask.bool()]
    assert float(kept.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(kept.pow(2).mean()) == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()


@pytest.fixture(scope="module")
def rm_checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    return save_weights(build_model(reward_model_config()), tmp_path_factory.mktemp("rm") / "rm.safetensors")


@pytest.fixture(scope="module")
def prompts(synth):
    from tpo.data import SampleDataset

    return SampleDataset(str(synth / "val.jsonl"), tasks=["qa"])


def make_ppo(rm_checkpoint, policy=None, **kwargs):
    torch.manual_seed(0)
    policy = policy or build_model(policy_config())
    spec = dict(reward_model=dict(config=reward_model_config(), checkpoint=rm_checkpoint), max_new_tokens=5)
    return build_algorithm(dict(type="PPO", **{**spec, **kwargs}), default_args={"model": policy})


def test_one_step_shapes_rewards_and_reports_trl_metrics(rm_checkpoint, prompts):
    algo = make_ppo(rm_checkpoint, ppo_epochs=2, missing_eos_penalty=-3.0, length_coef=-0.5, kl_coef=0.2)
    collate = algo.build_collator()
    batch = collate([prompts[i] for i in range(4)])
    assert batch["input_ids"][:, 0].eq(algo.model.tokenizer.pad_token_id).any() or True  # left padding
    algo.on_step(0, 2)
    out = algo.step(batch)
    out["loss"].backward()
    names = {"objective/scores", "objective/rm_scores", "objective/kl", "objective/kl_coef", "objective/entropy",
             "objective/non_score_reward", "objective/rlhf_reward", "policy/approxkl_avg", "policy/clipfrac_avg",
             "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens",
             "response/length", "objective/qa_accuracy"}
    assert names <= set(out)
    # the first update is on-policy: ratio 1, nothing clipped
    assert float(out["val/ratio"]) == pytest.approx(1.0, abs=1e-4)
    assert float(out["policy/clipfrac_avg"]) == 0.0
    # the paper's penalties: score = rm + length_coef * len / max_new + penalty if no EOS
    chunk = algo._rollouts[0][0]
    lengths = chunk["mask"].sum(1).float()
    has_eos = (chunk["response"] == algo.model.tokenizer.eos_token_id).any(1).float()
    expected = float(out["objective/rm_scores"]) + float((-0.5 * lengths / 5 - 3.0 * (1 - has_eos)).mean())
    assert float(out["objective/scores"]) == pytest.approx(expected, abs=1e-5)
    # the value model gets gradients, the frozen reward model none
    assert any(p.grad is not None for p in algo.value_model.parameters())
    assert all(not p.requires_grad for p in algo._frozen["reward_model"].parameters())
    assert "value_model.value_head.weight" in algo.state_dict()


def test_each_batch_of_rollouts_gets_ppo_epochs_updates(rm_checkpoint, prompts, monkeypatch):
    """As the engine drives it: on_step, then ppo_epochs x (on_update, a step
    per micro-batch, an optimiser step). The rollouts are sampled once per
    engine step and micro-batch; every update trains on the same ones."""
    algo = make_ppo(rm_checkpoint, ppo_epochs=3)
    assert algo.updates_per_batch == 3
    collate = algo.build_collator()
    batches = [collate([prompts[2 * i], prompts[2 * i + 1]]) for i in range(4)]
    sampled = []
    rollout = PPO.rollout

    def counting(self, batch):
        sampled.append(list(batch["ids"]))
        return rollout(self, batch)

    monkeypatch.setattr(PPO, "rollout", counting)
    optimizer = torch.optim.SGD([p for p in algo.parameters() if p.requires_grad], lr=0.05)
    for step in range(2):  # two micro-batches per step (gradient accumulation)
        algo.on_step(step, 2)
        ratios = []
        for k in range(algo.updates_per_batch):
            algo.on_update(k, algo.updates_per_batch)
            outs = [algo.step(batches[2 * step + m]) for m in range(2)]
            sum(o["loss"] for o in outs).backward()
            optimizer.step()
            optimizer.zero_grad()
            ratios.append(float(outs[0]["val/ratio"]))
            assert [c["ids"] for c, _ in algo._rollouts] == [batches[2 * step + m]["ids"] for m in range(2)]
        assert ratios[0] == pytest.approx(1.0, abs=1e-4)  # the first update is on-policy
        assert abs(ratios[1] - 1.0) > 1e-4  # later ones: the policy moved away from the one that sampled
    assert sampled == [batches[i]["ids"] for i in range(4)]  # each micro-batch rolled out once, not per update
    algo.on_step(2, 3)
    algo.on_update(1, 3)
    with pytest.raises(RuntimeError, match="more micro-batches than its first"):
        algo.step(batches[0])


def test_adaptive_kl_and_k3(rm_checkpoint, prompts):
    algo = make_ppo(rm_checkpoint, adaptive_kl=dict(target=1e-6, horizon=10), kl_estimator="k3", kl_coef=0.1)
    batch = algo.build_collator()([prompts[i] for i in range(4)])
    algo.on_step(0, 1)
    out = algo.step(batch)
    # the KL of the first rollout is ~0 (policy = reference): below target, the coefficient shrinks
    assert float(out["objective/kl"]) == pytest.approx(0.0, abs=1e-5)
    assert float(algo.kl_coef) == pytest.approx(0.1 * (1 - 0.2 * 4 / 10))


def test_lora_policy_with_adapters_off_as_reference(rm_checkpoint, prompts):
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    llm = {**policy_config()["llm"], "lora": lora}
    policy = build_model(policy_config(llm=llm))
    with torch.no_grad():  # move the adapters away from zero: the policy differs from its base
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    algo = make_ppo(rm_checkpoint, policy=policy, reference="adapter")
    assert "reference" not in algo._frozen  # no second copy
    initial = copy.deepcopy(policy)
    batch = algo.build_collator()([prompts[i] for i in range(4)])
    chunk = algo.rollout(batch)
    with torch.no_grad():  # training moves the policy's other trained parameters (the projector) too
        for p in policy.projector.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    seq = {k: chunk[k] for k in ("input_ids", "attention_mask", "media", "ids")}
    ref = algo._reference_logps(seq, chunk["prompt_len"], chunk["response"], chunk["mask"])
    with initial.llm.model.disable_adapter():  # the reference: the initial policy's base
        base, _ = algo._token_logps(initial, seq, chunk["prompt_len"], chunk["response"], chunk["mask"])
    torch.testing.assert_close(ref, base)
    assert not torch.allclose(ref * chunk["mask"], chunk["logps"])
    with pytest.raises(ValueError, match="algorithm.reference: 'adapter'"):
        from tpo.registry import config_key

        with config_key("algorithm"):
            PPO(build_model(policy_config()), reward_model=dict(config=reward_model_config(), checkpoint=rm_checkpoint),
                reference="adapter")


@pytest.mark.parametrize("cfg, error, match", [
    (dict(type="PPO"), KeyError, "algorithm.reward_model: missing"),
    (dict(type="PPO", reward_model="rm.pt"), TypeError, "algorithm.reward_model: give dict"),
    (dict(type="PPO", reward_model=dict(config="x", chekpoint="y")), KeyError, "reward_model.chekpoint"),
    (dict(type="PPO", reward_model=dict(config="x"), kl_estimator="k2"), ValueError, "algorithm.kl_estimator"),
    (dict(type="PPO", reward_model=dict(config="x"), top_p=0), ValueError, "algorithm.top_p"),
    (dict(type="PPO", reward_model=dict(config="x"), adaptive_kl=dict(target=1)), ValueError, "adaptive_kl"),
])
def test_config_errors(cfg, error, match):
    with pytest.raises(error, match=match):
        PPO.check_config(cfg)


def test_scorer_must_share_the_tokenizer(rm_checkpoint):
    other = reward_model_config(**{"tokenizer.vocab_size": 600})
    with pytest.raises(ValueError, match="tokenizer differs"):
        make_ppo(rm_checkpoint, value_model=dict(config=other))


def test_scorer_must_prepare_pixels_as_the_policy_does(rm_checkpoint):
    """48-pixel frames in 12-pixel patches: as many visual tokens as the policy's 32 in 8, but other pixels."""
    other = reward_model_config(**{"vision_encoder.model_kwargs.img_size": 48,
                                   "vision_encoder.model_kwargs.patch_size": 12})
    with pytest.raises(ValueError, match=r"value_model: its vision encoder's image_size is \(48, 48\), the policy's "
                                         r"\(32, 32\)"):
        make_ppo(rm_checkpoint, value_model=dict(config=other))


def test_resume_through_the_engine_is_exact(synth, rm_checkpoint, tmp_path):
    """6 steps straight, or 3 steps, a stop, and 3 more from the checkpoint:
    the same policy, value model and per-step metrics."""
    from safetensors.torch import load_file

    from tpo.engine import train

    opts = {**QUIET, "load_from": None, "model.num_frames": NUM_FRAMES,
            "algorithm.reward_model.checkpoint": rm_checkpoint,
            "algorithm.reward_model.cfg_options": {"model.num_frames": NUM_FRAMES},
            "algorithm.max_new_tokens": 4, "algorithm.ppo_epochs": 2, "train.batch_size": 2, "train.max_steps": 6,
            "data.train.ann_file": str(synth / "val.jsonl"), "data.val": None, "evaluation.metrics": [],
            "checkpoint.interval": 3, "checkpoint.keep_last": None, "optim.lr": 1e-3,
            "train.log_interval": 1}
    train(PPO_CONFIG, cfg_options=opts, work_dir=str(tmp_path / "a"))
    train(PPO_CONFIG, cfg_options={**opts, "train.max_steps": 3}, work_dir=str(tmp_path / "b"))
    train(PPO_CONFIG, cfg_options=opts, work_dir=str(tmp_path / "b"), resume=True)
    a, b = tmp_path / "a" / "checkpoints" / "step_00000006", tmp_path / "b" / "checkpoints" / "step_00000006"
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = torch.load(a / "algorithm_state.pt", weights_only=True)
    sb = torch.load(b / "algorithm_state.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))
    assert not list(a.glob("process_state_*"))  # rollouts live within a step: nothing pending at a checkpoint
    # ppo_epochs=2 optimiser updates on each of the 6 batches; the schedule stepped once a batch
    oa = torch.load(a / "optimizer.bin", weights_only=False)
    steps = {float(v["step"]) for v in oa["state"].values()}
    assert steps == {12.0}
    assert torch.load(a / "custom_checkpoint_0.pkl", weights_only=False)["last_epoch"] == 6
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if json.loads(line)["split"] == "train"]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6]  # nothing lost, nothing twice


PPO_DRIVER = """
import json, sys
sys.path.insert(0, {kit!r})
from rlaif_testkit import PPO_CONFIG
from tpo.algorithms.ppo import PPO
from tpo.engine import train

opts = json.loads({opts!r})
train(PPO_CONFIG, cfg_options=opts, work_dir={full!r})


class Stop(Exception):
    pass


original = PPO.on_step


def crash(self, step, total):
    if step == {crash_at}:
        raise Stop("killed")
    return original(self, step, total)


PPO.on_step = crash  # killed before step {crash_at} + 1, on every process
try:
    train(PPO_CONFIG, cfg_options=opts, work_dir={cut!r})
except Stop:
    pass
else:
    raise SystemExit("the run was not stopped")
PPO.on_step = original
train(PPO_CONFIG, cfg_options=opts, work_dir={cut!r}, resume=True)
import torch.distributed as dist
dist.destroy_process_group()  # before exit: a live gloo group can abort the interpreter's shutdown
"""


def test_two_process_resume_is_exact(synth, rm_checkpoint, tmp_path):
    """Two processes (gloo), two micro-batches each per step, two PPO updates
    on each batch of rollouts, the adaptive KL coefficient: 4 steps straight,
    or killed during step 4 and resumed from the checkpoint of step 2: the
    same per-step losses and metrics, weights, value model and coefficient
    (each process's generator state restored from its own file)."""
    from pathlib import Path

    from rlaif_testkit import run_torchrun
    from safetensors.torch import load_file

    opts = {**QUIET, "load_from": None, "model.num_frames": NUM_FRAMES,
            "algorithm.reward_model.checkpoint": rm_checkpoint,
            "algorithm.reward_model.cfg_options": {"model.num_frames": NUM_FRAMES},
            "algorithm.max_new_tokens": 4, "algorithm.ppo_epochs": 2,
            "algorithm.adaptive_kl": {"_delete_": True, "target": 0.01, "horizon": 100},
            "train.batch_size": 4, "train.micro_batch_size": 1, "train.max_steps": 4,
            "data.train.ann_file": str(synth / "val.jsonl"), "data.val": None, "evaluation.metrics": [],
            "checkpoint.interval": 2, "checkpoint.keep_last": None, "optim.lr": 1e-3, "train.log_interval": 1}
    script = tmp_path / "driver.py"
    full, cut = tmp_path / "full", tmp_path / "cut"
    script.write_text(PPO_DRIVER.format(kit=str(Path(__file__).resolve().parent), opts=json.dumps(opts),
                                        full=str(full), cut=str(cut), crash_at=3))
    run_torchrun(str(script))

    def train_records(work):
        rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r["split"] == "train"]

    a, b = train_records(full), train_records(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # step 3 of the killed run replaced, not repeated
    for ra, rb in zip(a, b):
        for key in ("loss", "objective/kl", "objective/kl_coef", "objective/scores", "val/ratio"):
            assert rb[key] == ra[key], (ra["step"], key)
    ca, cb = full / "checkpoints" / "step_00000004", cut / "checkpoints" / "step_00000004"
    state = json.loads((cb / "trainer_state.json").read_text())
    assert (state["num_processes"], state["grad_accum"]) == (2, 2)
    wa, wb = load_file(str(ca / "model.safetensors")), load_file(str(cb / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = torch.load(ca / "algorithm_state.pt", weights_only=True)
    sb = torch.load(cb / "algorithm_state.pt", weights_only=True)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not list(cb.glob("process_state_*"))
