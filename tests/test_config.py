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
