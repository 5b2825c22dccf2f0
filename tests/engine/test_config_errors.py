"""Config errors are reported before any model is built, naming the key."""
import re

import pytest
from engine_testkit import qa_items, train_config

import tpo.engine.trainer as trainer_module
from tpo.engine import Trainer, train_main
from tpo.engine.config import validate


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if a model is built."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built before the config error was reported")

    monkeypatch.setattr(trainer_module, "build_model", forbidden)
    monkeypatch.setattr(trainer_module, "build_algorithm", forbidden)


CASES = [
    (dict(train={"max_stpes": 3}), KeyError, r"train\.max_stpes: unknown key; did you mean 'max_steps'"),
    (dict(train={"batch_size": "4"}), ValueError, r"train\.batch_size: must be a positive integer, got '4'"),
    (dict(train={"max_steps": 2, "max_epochs": 1}), ValueError, r"train\.max_steps / train\.max_epochs"),
    (dict(train={"batch_size": 6, "micro_batch_size": 4}), ValueError, r"train\.batch_size: 6 .*micro_batch_size 4"),
    (dict(train={"mixed_precision": "bf32"}), ValueError, r"train\.mixed_precision: must be one of"),
    (dict(optim={"lr": -1.0}), ValueError, r"optim\.lr: must be a number > 0"),
    (dict(optim={"param_groups": {"head": {"lr": 1e-3}}}), KeyError, r"optim\.param_groups\.head\.pattern: missing"),
    (dict(optim={"param_groups": {"lora": {"lr": 1e-3, "wd": 0}}}), KeyError, r"optim\.param_groups\.lora\.wd"),
    (dict(optim={"param_groups": {"x": {"pattern": "(", "lr": 1}}}), ValueError, r"param_groups\.x\.pattern"),
    (dict(schedule={"type": "cosin"}), ValueError, r"schedule\.type: must be one of 'cosine'"),
    (dict(optm={"lr": 1e-3}), KeyError, r"optm: unknown key; did you mean 'optim'"),
    (dict(algorithm={"type": "DPPO"}), KeyError, r"algorithm\.type: 'DPPO' is not in the tpo 'algorithm' registry"),
    (dict(algorithm={"type": "DPO", "refrence": "copy"}), TypeError, r"algorithm\.refrence: .*'reference'"),
    (dict(algorithm={"type": "DPO", "reference": "frozen"}), ValueError, r"algorithm\.reference: use one of"),
    (dict(algorithm={"type": "DPO", "loss": {"type": "DPOLos"}}), KeyError, r"algorithm\.loss\.type: 'DPOLos'"),
    (dict(algorithm={"type": "DPO", "loss": {"type": "DPOLoss", "betta": 0.1}}), TypeError,
     r"algorithm\.loss\.betta: DPOLoss got an unexpected argument"),
    (dict(algorithm={"type": "SFT", "model": {}}), TypeError, r"algorithm\.model"),
    (dict(model={"type": "MultimodalLLM", "projecter": {}}), TypeError, r"model\.projecter: .*'projector'"),
    (dict(evaluation={"metrics": [{"type": "QAAcuracy"}]}), KeyError, r"evaluation\.metrics\[0\]\.type"),
    (dict(checkpoint={"keep_last": 0}), ValueError, r"checkpoint\.keep_last"),
    (dict(data={"collator": {"max_lenght": 64}}), TypeError, r"data\.collator\.max_lenght: .*'max_length'"),
    (dict(load_from="/no/such/checkpoint"), FileNotFoundError, r"load_from: '/no/such/checkpoint' does not exist"),
]


@pytest.mark.parametrize("sections,error,pattern", CASES, ids=[c[2][:30] for c in CASES])
def test_config_error_before_build(tmp_path, no_build, sections, error, pattern):
    cfg = train_config(tmp_path, **sections)
    with pytest.raises(error, match=pattern):
        Trainer(cfg, train_dataset=qa_items(8)).fit()


@pytest.mark.parametrize("batch,micro,world,fix", [
    (6, None, 4, "train.batch_size=8"),  # no micro-batch size fits 6 samples on 4 processes
    (6, 3, 4, "train.batch_size=12"),
    (8, 4, 4, "train.micro_batch_size=2"),
])
def test_batch_geometry_error_suggests_a_fix_that_works(tmp_path, batch, micro, world, fix):
    def geometry(**train):
        cfg = train_config(tmp_path, train={"batch_size": batch, "micro_batch_size": micro, **train})
        return Trainer(cfg, train_dataset=qa_items(8))._batch_geometry(world)

    with pytest.raises(ValueError, match=rf"train\.batch_size: {batch} samples per step .* e\.g\. {fix}\b"):
        geometry()
    key, value = fix.split("=")
    micro_out, accum = geometry(**{key.split(".")[1]: int(value)})
    assert micro_out * accum * world == (int(value) if key == "train.batch_size" else batch)


def test_missing_data_file_names_the_key(tmp_path, no_build):
    cfg = train_config(tmp_path, data={"train": {"type": "SampleDataset", "ann_file": str(tmp_path / "nope.jsonl")}})
    with pytest.raises(FileNotFoundError, match=r"data\.train\.ann_file: .*nope\.jsonl' does not exist"):
        Trainer(cfg).fit()
    found = tmp_path / "found.jsonl"
    found.write_text("")
    cfg["data"]["train"] = {"type": "MixedDataset", "datasets": [  # the files inside a dataset config too
        {"type": "SampleDataset", "ann_file": str(found)}, {"type": "SampleDataset", "ann_file": str(tmp_path / "x")}]}
    with pytest.raises(FileNotFoundError, match=r"data\.train\.datasets\.1\.ann_file: .*x' does not exist.*"
                                                r"--cfg-options data\.train\.datasets\.1\.ann_file=PATH"):
        Trainer(cfg)
    cfg["data"]["train"] = {"type": "SampleDatasett", "ann_file": "x"}
    with pytest.raises(KeyError, match=r"data\.train\.type: 'SampleDatasett'"):
        Trainer(cfg)


def test_errors_from_a_config_file_name_the_file(tmp_path, no_build, capsys):
    path = tmp_path / "bad.py"
    base = trainer_module.Path(__file__).resolve().parents[2] / "configs" / "mllm" / "timm_mlp_llama.py"
    path.write_text(
        f"_base_ = [{str(base)!r}]\n"
        "algorithm = dict(type='SFT')\n"
        "data = dict(train=dict(type='SampleDataset', ann_file='x.jsonl'))\n"
        "train = dict(batch_size=2, max_steps=1)\n"
        "optim = dict(lr=1e-3)\n"
        "scheduel = dict(type='cosine')\n"
    )
    # `tpo train` prints them in one line and exits 2 (Trainer, the Python entry, raises them)
    assert train_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"scheduel: unknown key; did you mean 'schedule'\?.*\[config .*bad\.py\]", err)
    with pytest.raises(KeyError, match=r"scheduel: unknown key"):
        Trainer(str(path))
    # the model parts the _base_ file brings (vision_encoder, llm, tokenizer) are not errors
    path.write_text(path.read_text().replace("scheduel", "schedule"))
    assert train_main([str(path)]) == 2
    assert "data.train.ann_file" in capsys.readouterr().err
    # --cfg-options keys are checked like the file's own
    assert train_main([str(path), "--cfg-options", "trian.max_steps=3"]) == 2
    assert "trian: unknown key; did you mean 'train'" in capsys.readouterr().err


def test_defaults_are_filled_in():
    cfg = validate(train_config("w"), datasets_given=True, collate_given=True)
    assert cfg["train"]["grad_clip"] == 1.0 and cfg["train"]["micro_batch_size"] is None
    assert cfg["optim"]["betas"] == (0.9, 0.999) and cfg["checkpoint"]["keep_last"] == 2
    assert cfg["work_dir"] == "w"


def test_dict_configs_allow_model_parts_but_not_typos():
    cfg = train_config("w", llm={"type": "HFCausalLM"}, tasks={"region": {}})  # parts a _base_ file brings
    validate(cfg, datasets_given=True, collate_given=True)
    with pytest.raises(KeyError, match=r"evaluaton: unknown key; did you mean 'evaluation'"):
        validate(train_config("w", evaluaton={"interval": 1}), datasets_given=True, collate_given=True)


def test_an_evaluation_interval_without_validation_data_is_refused_before_any_build(tmp_path, no_build):
    """A Trainer given its training set but no validation set (tests, notebooks) would never validate."""
    cfg = train_config(tmp_path, evaluation={"interval": 2})
    with pytest.raises(ValueError, match=r"evaluation\.interval: 2, but there is no validation data; give data\.val"):
        Trainer(cfg, train_dataset=qa_items(8)).fit()
