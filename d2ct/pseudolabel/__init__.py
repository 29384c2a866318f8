"""Pseudo-labelling: radiologist weights, partition and consensus modes, the pool run."""
