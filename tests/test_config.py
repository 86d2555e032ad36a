from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from jobs.config import ConfigError, dump_config, load_config, parse_override


@dataclass
class Inner:
    lr: float = 1e-4
    targets: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass
class Outer:
    name: str = "run"
    steps: int = 10
    stage: Literal[1, 2] = 1
    flag: bool = False
    ratios: tuple[float, float] = (0.5, 0.5)
    path: Optional[str] = None
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def test_yaml_then_overrides_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 5\ninner:\n  lr: 0.01\n")
    cfg = load_config(Outer, f, ["inner.lr=0.5", "stage=2", "ratios=[0.2, 0.8]", "flag=true", "path=null"])
    assert cfg.steps == 5 and cfg.stage == 2 and cfg.flag is True and cfg.path is None
    assert cfg.inner.lr == 0.5 and cfg.ratios == (0.2, 0.8)
    assert cfg.inner.targets == ("q_proj", "v_proj")


def test_int_is_accepted_where_float_is_expected():
    assert load_config(Outer, None, ["inner.lr=1"]).inner.lr == 1.0


@pytest.mark.parametrize("override, fragment", [
    ("stepz=3", "unknown config key stepz"),
    ("inner.lrr=3", "unknown config key inner.lrr"),
    ("steps=ten", "steps: expected an integer"),
    ("stage=3", "stage: 3 is not one of 1, 2"),
    ("flag=yes please", "flag: expected true or false"),
    ("ratios=[1, 2, 3]", "ratios: expected 2 values"),
    ("steps=-1", "steps must be >= 0"),
    ("noequals", "not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(Outer, None, [override])


def test_bad_files_are_reported_with_their_path(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: top level must be a mapping"):
        load_config(Outer, bad)


def test_dump_round_trips(tmp_path):
    cfg = load_config(Outer, None, ["inner.targets=[a, b, c]", "steps=7"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_config(cfg))
    assert load_config(Outer, f) == cfg


def test_override_values_are_yaml():
    assert parse_override("a.b={x: 1}") == ("a.b", {"x": 1})
    assert parse_override("s=hello world") == ("s", "hello world")
    assert parse_override("e=") == ("e", "")


def test_secrets_are_redacted_when_printed_or_saved(tmp_path):
    from jobs.config import save_config

    @dataclass
    class WithSecrets:
        storage_options: dict = field(default_factory=dict)

    cfg = load_config(WithSecrets, None, ["storage_options={key: AKIA1, secret: s3cr3t, client_kwargs: {aws_session_token: t0k}}"])
    text = dump_config(cfg)
    assert "s3cr3t" not in text and "t0k" not in text and "AKIA1" in text
    assert "s3cr3t" not in save_config(cfg, tmp_path / "c.yaml").read_text()
    assert cfg.storage_options["secret"] == "s3cr3t"  # only the rendering is redacted


def test_redaction_matches_whole_words_only():
    from jobs.config import is_secret_key

    for key in ("secret", "aws_session_token", "db-password", "private_key", "token"):
        assert is_secret_key(key), key
    for key in ("global_tokens", "max_new_tokens", "key", "tokenizer", "secretary_name"):
        assert not is_secret_key(key), key
