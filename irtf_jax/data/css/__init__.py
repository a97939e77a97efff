"""What both CSS datasets share (Vo et al., CVPR 2019).

scenes    the scene grammar: objects on a 3x3 grid, captions, and the
          modifications in CSS's wording;
render    CSS's 2D renderer;
generate  scene families grown by chained modifications (`css_synth`);
split     `Mod`, `CSSSplit` (TIRG's CSS protocol) and the TFDS records
          that `css_synth` and `css3d` write and read.
"""
