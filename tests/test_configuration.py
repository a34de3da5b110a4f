"""The generic config loader (rlvr.utils.options) on a config tree it has never seen, and the loss-type table."""

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlvr.forking.selection import LOSS_NORMALIZATION_UNITS, loss_normalization_unit
from rlvr.utils.options import (
    ConfigError,
    describe_fields,
    option,
    passthrough,
    read_layers,
    require,
    validate_tree,
)

ENGINE_OPTIONS = frozenset({"lr", "steps"})


@dataclass
class Inner:
    size: int = option(2, "a size")
    mode: str = option("a", "a mode", ("a", "b"))

    def validate(self) -> None:
        require(self.size >= 1, "size", f"must be >= 1; got {self.size}")


@dataclass
class Outer:
    name: str = option("x", "a name")
    inner: Inner = option(Inner, "the inner section")
    engine: dict = passthrough(lambda: ENGINE_OPTIONS, "another library's options", shown_default={"lr": 0.1})


def load(overrides, path=None):
    config = read_layers(Outer(), path, overrides)
    validate_tree(config)
    return config


def test_layers_overrides_and_passthrough_on_a_foreign_tree(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("inner: {size: 3}\nengine: {lr: 0.5}\n")
    config = load(["--inner.mode", "b", "steps=7"], path)  # a bare passthrough key lands in its dict
    assert config.inner == Inner(size=3, mode="b")
    assert config.engine == {"lr": 0.5, "steps": 7}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inner.size=0"], "inner.size: must be >= 1; got 0"),  # the section's own rule, prefixed
        (["inner.mode=c"], "inner.mode: must be one of a, b; got 'c'"),
        (["inner.sise=1"], "inner.sise: unknown key; did you mean size?"),
        (["engine.lrr=1"], "engine.lrr: unknown key; did you mean lr?"),
        (["stepz=1"], "stepz: unknown key; did you mean engine.steps?"),
        (["inner.size=big"], "inner.size: expected an integer, got 'big'"),
    ],
)
def test_errors_name_the_dotted_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        load(overrides)
    assert str(error.value) == message


def test_help_lists_every_leaf_with_its_shown_default():
    rows = {key: (default, text) for key, default, text in describe_fields(Outer)}
    assert list(rows) == ["name", "inner.size", "inner.mode", "engine"]
    assert rows["inner.mode"] == ("a", "a mode [a|b]")
    assert rows["engine"][0] == "{lr: 0.1}"


def test_the_loader_knows_no_section_by_name():
    import rlvr.utils.options as configuration

    text = Path(configuration.__file__).read_text()
    code = re.sub(r'""".*?"""', "", text, flags=re.S)  # docstrings may give examples
    for section in ("forking", "moe", "grpo", "warm_start", "reward", "RunConfig", "trl"):
        assert not re.search(rf"\b{section}\b", code), section


def test_every_trl_loss_type_has_a_normalisation_unit():
    from trl import GRPOConfig

    help_text = next(f for f in dataclasses.fields(GRPOConfig) if f.name == "loss_type").metadata["help"]
    supported = help_text.split("Supported values are")[1].split(".")[0]
    trl_types = set(re.findall(r"'([a-z_]+)'", supported))
    assert trl_types and trl_types == set(LOSS_NORMALIZATION_UNITS)


def test_an_unknown_loss_type_is_a_config_error_naming_the_key():
    from rlvr.run.config import load_config

    with pytest.raises(ConfigError, match=r"^grpo\.loss_type: .*'made_up'"):
        load_config(None, ["grpo.loss_type=made_up"])
    with pytest.raises(ConfigError, match=r"^grpo\.loss_type"):
        loss_normalization_unit("made_up")
    assert loss_normalization_unit("dapo") == "generation_batch" and loss_normalization_unit("grpo") == "sequence"
