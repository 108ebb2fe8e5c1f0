"""Small models shipped with fastguide (the embedded digits default) and model adapters."""
