"""Instances -> label maps."""
