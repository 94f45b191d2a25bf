"""flexikern's ops: one public function per op, each with backends and a torch reference.

`fk.ops.patchify`, `fk.ops.unpatchify`, `fk.ops.patchify_packed`, `fk.ops.unpatchify_packed`,
`fk.ops.patch_embed`, `fk.ops.de_embed`, `fk.ops.varlen_attention`. Backends are chosen by `flexikern.ops._dispatch` (see
`python -m flexikern.info`); `use_backend(...)` or FLEXIKERN_BACKEND forces one.
"""

from flexikern.ops._dispatch import backends, select, use_backend
from flexikern.ops.de_embed import de_embed
from flexikern.ops.patch_embed import patch_embed
from flexikern.ops.patchify import patchify, patchify_packed, unpatchify, unpatchify_packed
from flexikern.ops.varlen_attention import varlen_attention

__all__ = ["patchify", "unpatchify", "patchify_packed", "unpatchify_packed", "patch_embed",
           "de_embed", "varlen_attention", "backends", "select", "use_backend"]
