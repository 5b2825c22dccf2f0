"""Judges: the context-aware rule judge against the synthetic benchmark's
answers, the no-context ablation, position-bias handling, LM judges built from
the registry, and their errors."""
import pytest
import torch
from tpo.registry import build_judge

from tpo.rlaif import Judge, LMJudge, RuleJudge, parse_options
from tpo.rlaif.prompts import check_template, render_judge_prompt

CONTEXT = ("The video shows three shapes on a gray background: a blue circle, a purple circle and a yellow diamond. "
           "At the start, the blue circle is at the left. At the start, the purple circle is at the centre. "
           "At 0.38, the yellow diamond enters at the left. From 0.38 to 0.50, the purple circle moves up and "
           "stops at the centre.")
MC = ("What colour is the shape at the centre at the start?\nOptions:\n(A) orange\n(B) purple\n(C) red\n(D) yellow\n"
      "Answer with the option's letter.")


def test_parse_options():
    assert parse_options(MC) == ["orange", "purple", "red", "yellow"]
    assert parse_options("What colour is it?") is None
    assert parse_options("Q\n(B) x\n(A) y") is None  # not in letter order


def test_rule_judge_prefers_the_answer_the_context_supports():
    judge = build_judge(dict(type="RuleJudge"))
    out = judge(MC, "D", "B", CONTEXT)
    assert out.preferred == 1 and out.consistent and out.confidence > 0.7
    assert "purple" in out.rationale and len(out.orders) == 2
    open_q = "In which direction does the purple circle move?"
    assert judge(open_q, "up", "left", CONTEXT).preferred == 0
    assert judge("What happens at 0.38?", "the blue circle leaves", "the yellow diamond enters",
                 CONTEXT).preferred == 1


def test_rule_judge_without_context_only_tells_form():
    judge = RuleJudge()
    assert judge(MC, "D", "B", None).preferred is None           # both well formed: a tie
    assert judge(MC, "B", "zq!", None).preferred == 0            # names no option
    assert judge("What colour?", "purple", "", None).preferred == 0
    assert judge("What colour?", "one two three four five six seven eight nine", "red", None).preferred == 1


def test_rule_judge_agreement_with_the_benchmark_answers_needs_the_context(synth):
    """On the synthetic validation questions, the correct option against a
    wrong one: with the description the judge is mostly right; without it,
    never better than a coin."""
    from tpo.data import SampleDataset
    from tpo.rlaif import question_text

    ds = SampleDataset(str(synth / "val.jsonl"), tasks=["qa"])
    judge = RuleJudge()
    with_ctx, without = [], []
    for k, s in enumerate(ds.samples):
        if s.meta["answer_type"] != "mc":
            continue
        item = {"conversations": [t.to_dict() for t in s.conversations]}
        right = s.meta["answer"]
        wrong = next(chr(65 + i) for i in range(len(s.meta["options"])) if chr(65 + i) != right)
        q, ctx = question_text(item), " ".join(s.description)
        score = {0: 1.0, 1: 0.0, None: 0.5}
        with_ctx.append(score[judge(q, right, wrong, ctx).preferred])
        without.append(score[judge(q, right, wrong, None).preferred])
    assert len(with_ctx) >= 30
    assert sum(with_ctx) / len(with_ctx) > 0.7
    assert sum(without) / len(without) == pytest.approx(0.5)


class FirstBiased(Judge):
    """Always prefers the answer shown first."""

    def compare(self, question, answer_a, answer_b, context=None, media=None, media_type=None):
        return 0.9, "first"


def test_both_orders_cancel_position_bias():
    out = FirstBiased()("q", "x", "y")
    assert out.preferred is None and not out.consistent and out.p_first == pytest.approx(0.5)
    one = FirstBiased(both_orders=False)("q", "x", "y")
    assert one.preferred == 0 and len(one.orders) == 1


@pytest.fixture(scope="module")
def tiny_mllm():
    from tpo.registry import build_model

    return build_model("configs/mllm/timm_mlp_llama.py", cfg_options={"model.num_frames": 2})


def test_lm_judge_reads_label_probabilities(tiny_mllm):
    judge = LMJudge(model=tiny_mllm)
    video = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    out = judge("What colour is the circle?", "red", "blue", CONTEXT, video, "video")
    assert 0 < out.p_first < 1 and len(out.orders) == 2
    # the order-averaged probability is what the two single-order probabilities say
    p1, p2 = out.orders[0]["p_first"], out.orders[1]["p_first"]
    assert out.p_first == pytest.approx(0.5 * (p1 + 1 - p2))
    assert out.preferred == (0 if out.p_first > 0.5 else 1)
    # the context changes what the judge reads
    bare = judge("What colour is the circle?", "red", "blue", None, video, "video")
    assert bare.orders[0]["p_first"] != pytest.approx(p1, abs=1e-7)
    # a rationale is generated when asked
    talk = LMJudge(model=tiny_mllm, rationale_tokens=4)("Q?", "a", "b", None, video, "video")
    assert "P(A)=" in talk.rationale


def test_lm_judge_text_only_from_the_llm_registry():
    from tpo.registry import load_config

    base = load_config("configs/_base_/models/llm_llama_tiny.py")
    tok = load_config("configs/_base_/models/tokenizer_tiny.py")
    judge = build_judge(dict(type="LMJudge", llm=base.llm.to_dict(), tokenizer=tok.tokenizer.to_dict()))
    out = judge("What colour is the circle?", "red", "blue", CONTEXT)
    assert 0 < out.p_first < 1


def test_lm_judge_policy_needs_a_policy(tiny_mllm):
    with pytest.raises(ValueError, match="'policy' means the model being sampled"):
        build_judge(dict(type="LMJudge", model="policy"))
    judge = build_judge(dict(type="LMJudge", model="policy"), default_args={"policy": tiny_mllm})
    assert judge.model is tiny_mllm


@pytest.mark.parametrize("cfg, error, match", [
    (dict(type="LMJudge"), ValueError, "give `model`"),
    (dict(type="LMJudge", model="policy", template="Q: {question} A: {answer_a}"), ValueError, "answer_b"),
    (dict(type="LMJudge", model="policy", template="{question}{answer_a}{answer_b}{video}"), ValueError, "video"),
    (dict(type="LMJudge", model="policy", labels=("A", "A")), ValueError, "same token"),
    (dict(type="RuleJudge", window=-1), ValueError, "judge.window"),
    (dict(type="RuleJudge", tie_margin=0.7), ValueError, "tie_margin"),
    (dict(type="RuleJudg"), KeyError, "did you mean 'RuleJudge'"),
])
def test_config_errors_name_the_key(cfg, error, match, tiny_mllm):
    with pytest.raises(error, match=match):
        build_judge(cfg, default_args={"policy": tiny_mllm} if cfg["type"] == "LMJudge" else None)


def test_template_rendering():
    check_template("{question} {answer_a} {answer_b} {context_block}{media}")
    template = "{context_block}Q {question} A {answer_a} B {answer_b}"
    text = render_judge_prompt(template, "q?", " x", "y ", "ctx", "video")
    assert text.startswith("Here is a detailed description of the video") and "ctx" in text and "A x B y" in text
    assert render_judge_prompt("{context_block}{question}{answer_a}{answer_b}", "q", "a", "b", None, None) == "qab"
