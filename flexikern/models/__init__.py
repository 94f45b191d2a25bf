"""FlexiDiT models, the DiT config registry and the checkpoint converters."""

from flexikern.models.dit import ADAPTERS, DIT_CONFIGS, FlexiDiT

__all__ = ["FlexiDiT", "DIT_CONFIGS", "ADAPTERS"]
