"""The simulated other-scanner copies used by benchmarks/real_accuracy.py (checking only)."""

import numpy as np
import pytest

from cxr_ray.data.shift import FRAMINGS, SCANNERS, apply_scanner, shifted_copy
from cxr_ray.data.synthetic import chest_image


def test_each_scanner_changes_the_image_deterministically():
    img = chest_image(224, True, np.random.default_rng(0))
    for name in SCANNERS:
        out = apply_scanner(img, name, seed=3)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.array_equal(out, apply_scanner(img, name, seed=3))
        assert np.abs(out.astype(int) - img).mean() > 1.0, name  # visibly different, still an image
    with pytest.raises(ValueError, match="unknown shift"):
        apply_scanner(img, "ct")


def test_shifted_copy_mixes_scanners_in_equal_shares():
    rng = np.random.default_rng(1)
    images = np.stack([chest_image(64, bool(i % 2), rng) for i in range(40)])
    out, which = shifted_copy(images, seed=0)
    assert out.shape == images.shape and len(which) == 40
    assert {which.count(s) for s in SCANNERS} == {10}
    again, which_again = shifted_copy(images, seed=0)
    assert np.array_equal(out, again) and which == which_again


def _film(h: int = 64, w: int = 64) -> np.ndarray:
    """A bright 'body' in the middle of a dark frame with black margins."""
    a = np.zeros((h, w), np.uint8)
    a[8:-8, 10:-10] = 180
    a[20:-20, 20:-20] = 120
    return a


@pytest.mark.parametrize("name", list(FRAMINGS))
def test_framing_shifts_change_where_the_film_ends(name):
    img = _film()
    out = apply_scanner(img, name, seed=1)
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)
    margin = lambda a: float((a < 20).mean())  # noqa: E731
    looser = name in ("loose_margin", "more_neck")
    assert (margin(out) > margin(img)) if looser else (margin(out) < margin(img))


def test_framing_family_mixes_its_shifts():
    images = np.stack([_film() for _ in range(10)])
    out, which = shifted_copy(images, seed=0, family="framing")
    assert sorted(set(which)) == sorted(FRAMINGS) and out.shape == images.shape
    with pytest.raises(ValueError, match="unknown shift family"):
        shifted_copy(images, family="weather")
