"""UCI Mushroom loader (the data of the paper's contextual bandit, section 5.3)."""

import os
from pathlib import Path

import pytest
import torch

from pyro_bbb.datasets import MUSHROOM_ATTRIBUTES, MUSHROOM_ENV, load_mushroom

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get(MUSHROOM_ENV) or REPO.parent / "shared" / "data" / "mushroom" / "agaricus-lepiota.data")

needs_data = pytest.mark.skipif(
    not DATA.is_file(), reason=f"Mushroom data not found at {DATA} (set {MUSHROOM_ENV})"
)


@needs_data
def test_shape_dtype_and_class_counts():
    x, edible = load_mushroom(DATA)
    assert x.shape == (8124, 117) and x.dtype == torch.float32
    assert edible.shape == (8124,) and edible.dtype == torch.int64
    assert int((edible == 1).sum()) == 4208 and int((edible == 0).sum()) == 3916
    assert set(x.unique().tolist()) == {0.0, 1.0}


@needs_data
def test_each_attribute_is_one_hot():
    x, _, names = load_mushroom(DATA, return_feature_names=True)
    assert len(names) == 117 and len(set(names)) == 117
    attributes = [n.split("=")[0] for n in names]
    assert list(dict.fromkeys(attributes)) == list(MUSHROOM_ATTRIBUTES)
    for attribute in MUSHROOM_ATTRIBUTES:
        cols = [i for i, a in enumerate(attributes) if a == attribute]
        assert torch.equal(x[:, cols].sum(1), torch.ones(8124)), attribute
    # '?' is a category of its own (stalk-root), the constant veil-type one column
    assert int(x[:, names.index("stalk-root=?")].sum()) == 2480
    assert attributes.count("veil-type") == 1


@needs_data
def test_directory_path_and_env_var(monkeypatch):
    x_dir, _ = load_mushroom(DATA.parent)
    monkeypatch.setenv(MUSHROOM_ENV, str(DATA))
    x_env, _ = load_mushroom()
    assert torch.equal(x_dir, x_env)


def test_missing_data_names_the_env_var(monkeypatch, tmp_path):
    monkeypatch.delenv(MUSHROOM_ENV, raising=False)
    with pytest.raises(ValueError, match=MUSHROOM_ENV):
        load_mushroom()
    with pytest.raises(FileNotFoundError, match=MUSHROOM_ENV):
        load_mushroom(tmp_path / "nope.data")


def test_malformed_file(tmp_path):
    bad = tmp_path / "bad.data"
    bad.write_text("e,x,s\n")
    with pytest.raises(ValueError, match="columns"):
        load_mushroom(bad)
    bad.write_text("z," + ",".join("a" * 22) + "\n")
    with pytest.raises(ValueError, match="class"):
        load_mushroom(bad)
