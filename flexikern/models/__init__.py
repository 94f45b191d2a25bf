"""FlexiDiT models (class-, text- and video-conditioned), the config registries and the checkpoint converters."""

from flexikern.models.dit import ADAPTERS, DIT_CONFIGS, FlexiDiT
from flexikern.models.pixart import PIXART_CONFIGS, FlexiPixArt, TextCondition
from flexikern.models.video import FlexiLatte

__all__ = ["FlexiDiT", "DIT_CONFIGS", "ADAPTERS", "FlexiPixArt", "PIXART_CONFIGS", "TextCondition", "FlexiLatte"]
