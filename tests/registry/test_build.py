"""The registry and the build functions: inputs, overrides, and errors."""
import json
import subprocess
import sys

import pytest
from mmengine.config import Config

from tpo.registry import (
    ALL_REGISTRIES,
    PROJECTORS,
    build_model,
    build_projector,
    build_tokenizer,
    load_config,
    registered_names,
)


def test_entry_point_needs_no_other_import():
    code = (
        "from tpo.registry import build_projector\n"
        "p = build_projector(dict(type='MLPProjector', in_dim=4, out_dim=6))\n"
        "print(type(p).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "MLPProjector"


def test_every_registry_has_tpo_scope_and_lazy_locations():
    expected = {"models", "vision_encoders", "projectors", "llms", "tokenizers", "task_heads",
                "losses", "datasets", "metrics", "judges", "algorithms"}
    assert expected <= set(ALL_REGISTRIES)
    for registry in ALL_REGISTRIES.values():
        assert registry.scope == "tpo"
        assert registry._locations, registry.name


@pytest.mark.parametrize("kind", ["dict", "config", "py", "yaml", "json"])
def test_build_accepts_dict_config_and_files(tmp_path, kind):
    cfg = dict(projector=dict(type="MLPProjector", in_dim=4, out_dim=6, hidden_dim=5))
    if kind == "dict":
        source = cfg["projector"]
    elif kind == "config":
        source = Config(cfg)
    else:
        path = tmp_path / f"cfg.{kind}"
        if kind == "py":
            path.write_text(f"projector = {cfg['projector']!r}\n")
        elif kind == "json":
            path.write_text(json.dumps(cfg))
        else:
            path.write_text("projector:\n  type: MLPProjector\n  in_dim: 4\n  out_dim: 6\n  hidden_dim: 5\n")
        source = str(path)
    projector = build_projector(source)
    assert projector.mlp[0].out_features == 5
    overridden = build_projector(source, cfg_options={"projector.hidden_dim": 7})
    assert overridden.mlp[0].out_features == 7


def test_component_options_are_relative_with_or_without_the_section(tmp_path):
    component = dict(type="MLPProjector", in_dim=4, out_dim=6, hidden_dim=5)
    for source in (component, Config(component)):
        for key in ("hidden_dim", "projector.hidden_dim"):
            assert build_projector(source, cfg_options={key: 7}).mlp[0].out_features == 7
        with pytest.raises(TypeError, match="hiden_dim"):
            build_projector(source, cfg_options={"hiden_dim": 7})


def test_file_options_outside_the_built_section_are_errors(tmp_path):
    base = tmp_path / "_base_"
    base.mkdir()
    (base / "dims.py").write_text("dims = dict(in_dim=3, out_dim=4)\n")
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        "_base_ = ['_base_/dims.py']\n"
        "projector = dict(type='MLPProjector', in_dim={{_base_.dims.in_dim}}, out_dim=4, hidden_dim=5)\n"
        "train = dict(max_steps=2)\n"
    )
    # a key relative to the section: the prefixed key is named
    with pytest.raises(KeyError) as err:
        build_projector(recipe, cfg_options={"hidden_dim": 9})
    assert "'hidden_dim'" in str(err.value) and "did you mean 'projector.hidden_dim'" in str(err.value)
    # the root value from _base_ was already substituted into `projector`, and another section of a
    # training config is not read by a build of the projector: changing either would change nothing
    for key in ("dims.in_dim", "train.max_steps"):
        head = key.split(".")[0]
        with pytest.raises(KeyError, match=rf"'{head}' is another key of the file's root.*'projector', or drop it"):
            build_projector(recipe, cfg_options={key: 9})
    assert build_projector(recipe, cfg_options={"projector.hidden_dim": 9}).mlp[0].out_features == 9
    assert build_projector(recipe).mlp[0].in_features == 3


def test_cli_build_refuses_an_option_it_would_ignore(capsys):
    from tpo.cli import main

    assert main(["build", "configs/mllm/timm_mlp_llama.py", "--cfg-options", "llm.config.num_hidden_layers=3"]) == 2
    assert "did you mean 'model.llm.config.num_hidden_layers'" in capsys.readouterr().err


def test_base_inheritance_and_overrides(tmp_path):
    base = tmp_path / "_base_"
    base.mkdir()
    (base / "proj.py").write_text("projector = dict(type='LinearProjector', in_dim=3, out_dim=4)\n")
    (tmp_path / "recipe.py").write_text(
        "_base_ = ['_base_/proj.py']\nmodel = dict(type='MLPProjector', in_dim=3, out_dim={{_base_.projector.out_dim}})\n"
    )
    cfg = load_config(tmp_path / "recipe.py", {"model.hidden_dim": 9})
    assert cfg.model.out_dim == 4 and cfg.model.hidden_dim == 9
    assert cfg.projector.type == "LinearProjector"


def test_unknown_type_names_registry_key_and_close_names():
    with pytest.raises(KeyError) as err:
        build_projector(dict(type="MLPProjektor", in_dim=2, out_dim=2))
    message = str(err.value)
    assert "'MLPProjektor'" in message and "'projector'" in message and "projector.type" in message
    assert "did you mean 'MLPProjector'" in message


def test_unexpected_argument_names_component_and_key():
    with pytest.raises(TypeError) as err:
        build_projector(dict(type="MLPProjector", in_dim=2, out_dim=2, hiden_dim=3))
    message = str(err.value)
    assert "MLPProjector" in message and "'hiden_dim'" in message and "projector.hiden_dim" in message
    assert "did you mean 'hidden_dim'" in message


def test_missing_required_argument_and_missing_type():
    with pytest.raises(TypeError, match="needs the argument.*'out_dim'"):
        build_projector(dict(type="MLPProjector", in_dim=2))
    with pytest.raises(KeyError, match="no 'type' key"):
        build_projector(dict(in_dim=2))


def test_missing_pretrained_names_path_and_config_key(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError) as err:
        build_tokenizer(dict(type="PretrainedTokenizer", pretrained=str(missing)))
    assert str(missing) in str(err.value) and "tokenizer.pretrained" in str(err.value)


def test_nested_keys_in_model_errors():
    cfg = dict(
        type="MultimodalLLM",
        vision_encoder=dict(type="NoSuchEncoder"),
        projector=dict(type="MLPProjector"),
        llm=dict(type="HFCausalLM", config=dict(model_type="llama")),
        tokenizer=dict(type="TinyTokenizer", vocab_size=300),
    )
    with pytest.raises(KeyError, match=r"model\.vision_encoder\.type"):
        build_model(cfg)


def test_bad_config_paths():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model("configs/no_such_config.py")
    with pytest.raises(ValueError, match="must end in one of"):
        build_model("configs/README.txt")


def test_registered_names_imports_locations():
    assert {"LinearProjector", "MLPProjector", "PoolingProjector"} <= set(registered_names(PROJECTORS))
