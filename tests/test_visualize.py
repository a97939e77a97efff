"""visualize: the retrieval grid shows each image in its cell and frames
hits green and misses red."""

import numpy as np
from PIL import Image

from irtf_jax import visualize
from irtf_jax.data.base import Query


class SolidSplit:
  """Image i is one solid colour, so each cell says which image it shows."""

  def __init__(self, captions, size=32):
    self.captions = captions
    self.size = size

  def colour(self, index):
    return np.array([(37 * index) % 256, (91 * index) % 256, 200], np.uint8)

  def image(self, index):
    return np.broadcast_to(self.colour(index), (self.size, self.size, 3))


def test_cells_show_their_images_and_frames_mark_hits(tmp_path):
  split = SolidSplit([f"caption {i % 4}" for i in range(12)])
  queries = [
      Query(
          source_index=0,
          text="make it so",
          target_caption="caption 1",
          target_index=5,
      ),
      Query(source_index=2, text="other", target_caption="caption 3"),
  ]
  neighbours = np.array([[5, 2, 9, 1], [6, 3, 11, 0]])
  path = tmp_path / "grid.png"
  visualize.save_retrievals(
      str(path), split, queries, neighbours, top_k=3, title="a title"
  )
  grid = np.asarray(Image.open(path).convert("RGB"))
  tile, frame = visualize._TILE, visualize._FRAME
  for row, query in enumerate(queries):
    shown = [query.source_index, query.target_index, *neighbours[row, :3]]
    for col, index in enumerate(shown):
      x, y = visualize.cell_box(row, col, title="a title")
      centre = grid[y + tile // 2, x + tile // 2]
      if index < 0:  # no known target: the cell stays empty
        np.testing.assert_array_equal(centre, [255, 255, 255])
        continue
      np.testing.assert_array_equal(
          grid[y : y + tile, x : x + tile],
          np.broadcast_to(split.colour(index), (tile, tile, 3)),
      )
      if col >= 2:
        hit = split.captions[index] == query.target_caption
        expected = visualize.HIT if hit else visualize.MISS
        np.testing.assert_array_equal(grid[y - frame, x + tile // 2], expected)
        np.testing.assert_array_equal(grid[y + tile // 2, x + tile], expected)
  # Both kinds occur: row 0 ranks its target first, row 1 misses at #1.
  assert split.captions[5] == "caption 1" and split.captions[6] != "caption 3"
  # The last cell fits inside the picture with its frame and caption lines.
  x, y = visualize.cell_box(1, 4, title="a title")
  assert grid.shape[1] >= x + tile + frame and grid.shape[0] >= y + tile
