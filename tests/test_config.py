from __future__ import annotations

import json

import pytest

from lad_fast.config import config_from_dict, config_to_dict, get_preset
from lad_fast.errors import ConfigError


@pytest.mark.parametrize("name", ["tiny", "lad"])
def test_preset_round_trips_through_json(name):
    cfg = get_preset(name)
    again = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert again == cfg


def test_lad_preset_is_the_official_geometry():
    g = get_preset("lad").geometry
    assert g.shape == (32, 256, 256)
    assert g.spacing == (2.3, 1.6, 1.6)
    assert g.hu_window == (-1000.0, 400.0)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny, lad"):
        get_preset("huge")


def test_unknown_field_is_rejected():
    data = config_to_dict(get_preset("tiny"))
    data["geometry"]["shaep"] = [1, 2, 3]
    with pytest.raises(ConfigError, match=r"GeometryConfig: unknown fields \['shaep'\]"):
        config_from_dict(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"geometry": {"shape": [32, 256]}},
            r"^GeometryConfig\.shape: expected a list of 3 values, got \[32, 256\]$",
        ),
        ({"geometry": {"shape": 5}}, r"^GeometryConfig\.shape: expected a list of 3 values, got 5$"),
        ({"vqgan": {"channels": 16}}, r"^VQGANConfig\.channels: expected a list, got 16$"),
        ({"geometry": [1, 2]}, r"^GeometryConfig: expected a mapping of its fields, got \[1, 2\]$"),
    ],
)
def test_hand_edited_shapes_and_sections_are_named_in_one_line(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_a_run_config_with_a_shape_of_length_2_is_one_line(tmp_path):
    from lad_fast.errors import CheckpointError
    from lad_fast.runs.rundir import RunDir

    run = RunDir.create(tmp_path / "r", get_preset("tiny"))
    raw = json.loads(run.config_path.read_text())
    raw["geometry"]["shape"] = [32, 256]
    run.config_path.write_text(json.dumps(raw))
    with pytest.raises(
        CheckpointError, match=r"config\.json does not hold a lad-fast config: .*shape: expected"
    ):
        RunDir.open(run.path).config()
