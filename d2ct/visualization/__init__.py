"""Pictures people check: overlays, grids, training curves."""
