"""Tests of CSS's 2D renderer (`irtf_jax.data.css.render`)."""

from __future__ import annotations

import numpy as np
import pytest

from irtf_jax.data.css import render

RED = (244, 35, 35)


def _obj(shape, color, size, pos):
  return {"shape": shape, "color": color, "size": size, "pos": pos}


def test_small_red_rectangle_top_left_covers_its_8x8_box():
  image = render.render_scene([_obj("rectangle", "red", "small", (0.2, 0.2))])
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  # Centre 0.2 * 64 = 12.8, half-size 4: rows and columns int(8.8)..int(16.8).
  expected = np.full((64, 64, 3), 255, np.uint8)
  expected[8:16, 8:16] = RED
  np.testing.assert_array_equal(image, expected)


def test_large_rectangle_is_16_px_wide():
  image = render.render_scene([_obj("rectangle", "blue", "large", (0.5, 0.8))])
  covered = np.argwhere(np.any(image != 255, axis=-1))
  # y = 32, x = 51.2, s = 8: rows 24..39, columns int(43.2)..int(59.2) - 1.
  assert covered[:, 0].min() == 24 and covered[:, 0].max() == 39
  assert covered[:, 1].min() == 43 and covered[:, 1].max() == 58
  assert len(covered) == 16 * 16
  np.testing.assert_array_equal(image[30, 50], (42, 75, 215))


def test_small_circle_is_css_diamond():
  image = render.render_scene([_obj("circle", "green", "small", (0.5, 0.5))])
  painted = np.any(image != 255, axis=-1)
  # y = x = 32, s = 4; row r spans [32 + |r-32| - 4, 32 - |r-32| + 4).
  widths = painted.sum(axis=1)
  np.testing.assert_array_equal(widths[28:37], [0, 2, 4, 6, 8, 6, 4, 2, 0])
  assert widths.sum() == 32
  np.testing.assert_array_equal(np.flatnonzero(painted[32]), np.arange(28, 36))
  np.testing.assert_array_equal(image[32, 30], (29, 205, 20))


def test_small_triangle_widens_downwards():
  image = render.render_scene([_obj("triangle", "yellow", "small", (0.5, 0.5))])
  painted = np.any(image != 255, axis=-1)
  # Row r in [28, 36): columns [int(32 - (r-28)/2), int(32 + (r-28)/2)).
  np.testing.assert_array_equal(
      painted.sum(axis=1)[28:36], [0, 1, 2, 3, 4, 5, 6, 7]
  )
  assert painted.sum() == 28
  np.testing.assert_array_equal(np.flatnonzero(painted[35]), np.arange(28, 35))


def test_later_objects_draw_over_earlier_ones_and_clip_at_the_border():
  image = render.render_scene([
      _obj("rectangle", "red", "large", (0.5, 0.5)),
      _obj("rectangle", "gray", "small", (0.5, 0.5)),
      _obj("rectangle", "cyan", "large", (0.0, 0.0)),
  ])
  np.testing.assert_array_equal(image[32, 32], (87, 87, 87))
  np.testing.assert_array_equal(image[25, 25], RED)
  assert np.all(image[:8, :8] == (41, 208, 208)) and np.all(image[8, 8] == 255)


def test_render_rejects_unknown_attributes():
  with pytest.raises(ValueError, match="shape 'star'"):
    render.render_scene([_obj("star", "red", "small", (0.5, 0.5))])
  with pytest.raises(ValueError, match="unknown 'pink'"):
    render.render_scene([_obj("circle", "pink", "small", (0.5, 0.5))])
