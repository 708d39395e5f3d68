"""Config: YAML/dict round trips, the documented defaults, and errors that name the fix."""

from pathlib import Path

import pytest

from logix.config import LogixConfig
from logix.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_default_yaml_documents_exactly_the_defaults():
    assert LogixConfig.from_yaml(ROOT / "configs" / "default.yaml").to_dict() == LogixConfig().to_dict()


def test_every_shipped_config_loads():
    for path in (ROOT / "configs").glob("*.yaml"):
        LogixConfig.from_yaml(path)


def test_round_trip_yaml_and_dict(tmp_path):
    cfg = LogixConfig.load(
        {
            "projection": {"kind": "identity"},
            "store": {"dtype": "bfloat16"},
            "capture": {"types": "Linear", "exclude": ["head"]},
        }
    )
    assert cfg.capture.types == ["Linear"]
    cfg.to_yaml(tmp_path / "c.yaml")
    again = LogixConfig.load(tmp_path / "c.yaml")
    assert again == cfg and LogixConfig.load(again) == cfg and LogixConfig.load(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"projecton": {}}, "unknown key 'projecton'; did you mean 'projection'"),
        ({"store": {"shard_row": 3}}, "unknown key 'store.shard_row'; did you mean 'store.shard_rows'"),
        ({"projection": {"rank_in": "64"}}, "projection.rank_in must be an integer"),
        ({"projection": {"rank_in": 0}}, "projection.rank_in must be at least 1"),
        (
            {"projection": {"kind": "gaussian"}},
            "projection.kind must be one of \\['identity', 'random', 'pca', 'kfac-whitened'\\]",
        ),
        ({"capture": {"bias": "yes"}}, "capture.bias must be true or false"),
        ({"capture": {"types": ["Lnear"]}}, "did you mean 'Linear'"),
        ({"query": {"damping": -1}}, "query.damping must be at least 0.0"),
        ({"query": []}, "query must be a mapping"),
    ],
)
def test_bad_values_name_what_is_expected(data, message):
    with pytest.raises(ConfigError, match=message):
        LogixConfig.load(data)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("capture: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        LogixConfig.load(p)
    with pytest.raises(ConfigError, match="does not exist"):
        LogixConfig.load(tmp_path / "missing.yaml")
    p.write_text("!!python/object:os.system {}\n")  # safe_load refuses to build objects
    with pytest.raises(ConfigError):
        LogixConfig.load(p)
