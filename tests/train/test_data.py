"""``training_dataset``: the one place a training command opens its prepared dataset or picks the phantoms."""

from __future__ import annotations

import pytest

from lad_fast.config import get_preset
from lad_fast.data.prepared import PreparedDataset
from lad_fast.errors import InputError
from lad_fast.train.data import training_dataset


def test_an_open_dataset_is_handed_on_as_it_is(tiny_phantoms):
    ds = PreparedDataset(tiny_phantoms)
    assert training_dataset(ds, get_preset("tiny")) is ds


def test_a_folder_is_opened_at_the_preset(tiny_phantoms):
    ds = training_dataset(tiny_phantoms, get_preset("tiny"))
    assert isinstance(ds, PreparedDataset) and ds.path == tiny_phantoms and len(ds) == 3


@pytest.mark.parametrize("opened", [True, False], ids=["open", "folder"])
def test_a_dataset_of_another_preset_is_refused(tiny_phantoms, opened):
    data = PreparedDataset(tiny_phantoms) if opened else tiny_phantoms
    with pytest.raises(InputError) as e:
        training_dataset(data, get_preset("lad"))
    msg = str(e.value)
    assert msg.startswith(f"{tiny_phantoms}: prepared at preset 'tiny', but 'lad' is needed")
    assert "lad-fast prepare SRC OUT --preset lad" in msg


def test_no_data_means_the_phantoms_of_the_preset(tiny_phantoms, monkeypatch, capsys):
    import lad_fast.data.cache

    asked = []
    monkeypatch.setattr(
        lad_fast.data.cache, "phantom_dataset", lambda preset: asked.append(preset) or tiny_phantoms
    )
    ds = training_dataset(None, get_preset("tiny"))
    assert asked == ["tiny"] and ds.path == tiny_phantoms
    assert "data: built-in phantoms at preset 'tiny'" in capsys.readouterr().err
