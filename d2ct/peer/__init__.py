"""Peers: other methods trained on the same labelled slices, as yardsticks for d2ct's (not stages of it)."""
