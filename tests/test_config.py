"""The typed config loader: unknown keys and wrong types are errors naming the key; overrides apply."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from speechssl.config import ConfigError, load_config, parse_overrides, save_config, to_dict


@dataclass
class Optim:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    name: str = "adam"


@dataclass
class Cfg:
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    layers: list[int] = field(default_factory=lambda: [4, 8])
    teacher: Optional[str] = None
    extra: dict = field(default_factory=dict)
    fp16: bool = False


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"steps": 20, "optim": {"lr": 1}}))
    cfg = load_config(Cfg, p, ["optim.betas=[0.8, 0.9]", "teacher=exp/final", "layers=[1,2,3]", "fp16=true"])
    assert cfg.steps == 20
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.teacher == "exp/final" and cfg.layers == [1, 2, 3] and cfg.fp16 is True
    out = tmp_path / "exp" / "config.yaml"
    save_config(cfg, out)
    assert load_config(Cfg, out) == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.8, 0.9]


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*did you mean 'lr'"):
        load_config(Cfg, None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"'stepz'.*'steps'"):
        load_config(Cfg, None, ["stepz=3"])


@pytest.mark.parametrize(
    "override, key",
    [("steps=ten", "steps"), ("steps=1.5", "steps"), ("optim.lr=fast", "optim.lr"), ("fp16=3", "fp16"),
     ("layers=[1, x]", r"layers\[1\]"), ("optim=3", "optim"), ("steps=null", "steps")],
)
def test_wrong_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(Cfg, None, [override])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "nope.yaml")


@dataclass
class Choice:
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    units: list[str] = field(default_factory=list)
    num_classes: Optional[dict] = None
    calls: list = field(default_factory=list)

    def normalize(self) -> None:
        self.calls.append("normalize")
        if self.num_classes is None and self.units:
            self.num_classes = {u: 100 for u in self.units}

    def validate(self) -> None:
        self.calls.append("validate")
        if self.units and set(self.num_classes) != set(self.units):
            raise ConfigError("config key 'num_classes' must name every label set in 'units'")


def test_literal_names_key_and_choices():
    assert load_config(Choice, None, ["precision=bf16"]).precision == "bf16"
    msg = r"config key 'precision' must be one of \['fp32', 'bf16', 'fp16'\], got 'fp64'"
    with pytest.raises(ConfigError, match=msg):
        load_config(Choice, None, ["precision=fp64"])


def test_normalize_runs_before_validate():
    cfg = load_config(Choice, None, ["units=[mfcc]"])
    assert cfg.calls == ["normalize", "validate"] and cfg.num_classes == {"mfcc": 100}
    with pytest.raises(ConfigError, match="every label set"):
        load_config(Choice, None, ["units=[mfcc]", "num_classes={km: 5}"])
