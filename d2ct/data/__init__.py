"""Stage 1: data I/O, COCO conversion, Detectron2 registration, phantom and volume import."""
