"""What makes a DiT flexible: PI-resize, positional tables, LoRA adapters.

The resize math lives in `flexikern.ops.resize` (the ops use it too); it is re-exported here.
"""

from flexikern.flexi.pos_embed import sincos_1d, sincos_2d
from flexikern.ops.resize import (lift_deembed, lift_embed, pi_resize, pi_resize_matrix,
                                  resize_deembed, resize_matrix)

__all__ = ["pi_resize", "resize_deembed", "lift_embed", "lift_deembed", "resize_matrix",
           "pi_resize_matrix", "sincos_1d", "sincos_2d"]
