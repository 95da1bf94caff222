"""The 2D job's MNI152 slice split: training and held-out blocks with a gap between them."""

import pytest

pytest.importorskip("nilearn")
pytest.importorskip("nibabel")

from medadapt.train.finetune2d import mni152_slice_sets  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mni152")


def _slices(dataset) -> list[int]:
    return [start for _, start in dataset.slabs.index]


@pytest.mark.parametrize("gap", [None, 0, 3])
def test_split_leaves_a_gap_between_training_and_held_out_slices(cache, gap):
    kwargs = {} if gap is None else {"gap": gap}
    train, held = mni152_slice_sets(16, cache_dir=cache, **kwargs)
    train_z, held_z = _slices(train), _slices(held)
    assert train_z == list(range(train_z[0], train_z[-1] + 1)) and held_z == list(range(held_z[0], held_z[-1] + 1))
    assert held_z[0] - train_z[-1] - 1 == (1 if gap is None else gap)


def test_bad_gap(cache):
    with pytest.raises(ValueError, match="gap"):
        mni152_slice_sets(16, cache_dir=cache, gap=-1)
    with pytest.raises(ValueError, match="gap of 1000"):
        mni152_slice_sets(16, cache_dir=cache, gap=1000)
