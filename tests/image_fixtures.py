"""Writers of small MIT-States and Fashion200k copies in their on-disk formats.

They live in `irtf_jax.data.fixtures`, shared with the smoke runs; this module
keeps the tests' import name.
"""

from irtf_jax.data.fixtures import (BLUE, GREEN, RED, banded_pixels,
                                    write_banded_jpeg, write_fashion200k,
                                    write_jpeg, write_mit_states,
                                    write_truncated_jpeg)

__all__ = ["BLUE", "GREEN", "RED", "banded_pixels", "write_banded_jpeg",
           "write_fashion200k", "write_jpeg", "write_mit_states",
           "write_truncated_jpeg"]
