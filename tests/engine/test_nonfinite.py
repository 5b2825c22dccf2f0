"""A NaN loss stops the run before the update, with an error naming the step,
the samples of the batch and the last good checkpoint."""
import pytest
import torch
from engine_testkit import conversation_collator, model_config, processor, qa_items, train_config
from tpo.registry import build_model

from tpo.engine import NonFiniteLossError, Trainer
from tpo.engine.checkpoint import list_checkpoints
from tpo.engine.sampler import epoch_permutation


def test_nan_loss_names_step_samples_and_checkpoint(tmp_path):
    items = qa_items(12)
    order = epoch_permutation(len(items), seed=0, epoch=0)
    bad = int(order[5])  # in the global batch of step 3 (batch size 2)
    items[bad]["id"] = "poisoned-sample"
    items[bad]["conversations"][1]["value"] = "purple"
    proc = processor()
    token = proc.tokenizer("purple", add_special_tokens=False).input_ids[-1]
    collate = conversation_collator(proc)
    clean = collate([it for i, it in enumerate(items) if i != bad])
    assert token not in clean["input_ids"]  # only the poisoned sample holds this token

    torch.manual_seed(0)
    model = build_model(model_config())
    with torch.no_grad():  # a corrupt embedding row: any sequence holding the token turns NaN
        model.llm.get_input_embeddings().weight[token] = float("nan")
    cfg = train_config(tmp_path, train={"batch_size": 2, "max_steps": 6},
                       checkpoint={"interval": 1, "keep_last": 5})
    with pytest.raises(NonFiniteLossError) as info:
        Trainer(cfg, model=model, train_dataset=items).fit()
    message = str(info.value)
    assert "step 3 " in message
    assert "nan" in message
    assert "poisoned-sample" in message and str(items[int(order[4])]["id"]) in message
    assert str(tmp_path / "checkpoints" / "step_00000002") in message
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [1, 2]


def test_nan_before_any_checkpoint_says_so(tmp_path):
    items = qa_items(4)
    cfg = train_config(tmp_path, train={"batch_size": 2, "max_steps": 2})
    torch.manual_seed(0)
    model = build_model(model_config())
    with torch.no_grad():
        model.projector.mlp[0].weight.fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match="step 1 .*none \\(no checkpoint was written yet\\)"):
        Trainer(cfg, model=model, train_dataset=items).fit()
