"""The data tools (each runnable as ``python -m d2ct.data.cli.<tool>`` and as a console script):
convert_to_coco, import_volume, make_holdout, make_phantom."""
