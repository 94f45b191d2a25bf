"""flexikern's ops: one public function per op, each with backends and a torch reference.

`fk.ops.patchify`, `fk.ops.unpatchify`, `fk.ops.patch_embed`, `fk.ops.de_embed`,
`fk.ops.varlen_attention`; the patch-size type `fk.ops.PatchSize`. Each op module ends its
backends with their priority list (`PATCH_EMBED_BACKENDS`, ...), declared to
`flexikern.ops._dispatch` below; `python -m flexikern.info` shows them, and `use_backend(...)`
or FLEXIKERN_BACKEND forces one.

The ops and kernels are a leaf library: they import nothing from flexikern's models, samplers or
runtime.
"""

from flexikern.ops import _dispatch
from flexikern.ops._dispatch import backends, select, use_backend
from flexikern.ops.de_embed import DE_EMBED_BACKENDS, de_embed
from flexikern.ops.patch_embed import PATCH_EMBED_BACKENDS, patch_embed
from flexikern.ops.patch_size import PatchSize
from flexikern.ops.patchify import PATCHIFY_BACKENDS, UNPATCHIFY_BACKENDS, patchify, unpatchify
from flexikern.ops.varlen_attention import VARLEN_ATTENTION_BACKENDS, varlen_attention

_dispatch.declare("patchify", PATCHIFY_BACKENDS)
_dispatch.declare("unpatchify", UNPATCHIFY_BACKENDS)
_dispatch.declare("patch_embed", PATCH_EMBED_BACKENDS)
_dispatch.declare("de_embed", DE_EMBED_BACKENDS)
_dispatch.declare("varlen_attention", VARLEN_ATTENTION_BACKENDS)

__all__ = ["patchify", "unpatchify", "patch_embed", "de_embed", "varlen_attention", "PatchSize",
           "backends", "select", "use_backend"]
