"""Generated conditioning data for the text-to-image and video examples (see `captioned`)."""
