"""FlexiDiT models (class-, text- and video-conditioned), the config registries and the checkpoint converters.

`base.FlexibleModel` holds what the families share; `layers` the shared blocks; `text` the text
condition of PixArt and Latte; `dit`, `pixart`, `latte` only what differs.
"""

from flexikern.models.dit import DIT_CONFIGS, FlexiDiT
from flexikern.models.latte import FlexiLatte
from flexikern.models.pixart import PIXART_CONFIGS, FlexiPixArt
from flexikern.models.text import TextCondition

__all__ = ["FlexiDiT", "DIT_CONFIGS", "FlexiPixArt", "PIXART_CONFIGS", "TextCondition", "FlexiLatte"]
