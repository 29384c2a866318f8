"""Predict label maps with a trained model and write a submission CSV or a NIfTI label volume.

INPUT is a folder of PNG slices (or a challenge data set folder: its test-images/ is used),
a NIfTI file (.nii/.nii.gz) or a DICOM series folder. For slices the output is a CSV in the
challenge layout (rows = pixels, one column per slice); for a volume, a NIfTI label volume on
the input's own grid with one label per 3-D structure (the slices are linked, docs/volumes.md),
plus a JSON side-car (volume, slice range and mean score of each structure) and colour tables for
ITK-SNAP (.label.txt) and 3D Slicer (.ctbl). Where masks overlap, the higher-scoring instance
wins; a slice with no instance above the threshold falls back to its best instances below it.

Examples (d2ct-predict = python tools/predict.py = python -m d2ct.engine.predict):
  d2ct-predict --model output/final --input datasets/phantom/test-images --out submission.csv
  d2ct-predict --model output/final --input scan.nii.gz --out scan_structures.nii.gz --flip-tta
  d2ct-predict --model output/final --input scan.nii.gz --out seg.nii.gz --size 256 --viz output/viz
  python tools/predict.py --model output/final --input test-images --out sub.csv.gz --viz output/viz \\
      --truth test-labels.csv.gz
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from d2ct.engine import launch_cli
from d2ct.engine.mapper import read_model_image
from d2ct.engine.predictor import BatchPredictor, load_trained, prediction_source
from d2ct.errors import DataError
from d2ct.postprocess.linking import label_maps_with_scores
from d2ct.postprocess.submission import (PostprocessOptions, find_slices, label_maps_from_predictions,
                                         save_instances, write_submission)
from d2ct.postprocess.volume_output import (add_linking_arguments, link_options_from_args, link_slice_folder,
                                            write_volume_prediction)
from d2ct.utils.cli import prog
from d2ct.utils.fileio import check_writable


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog=prog(), description="\n\n".join(doc[:2]), epilog=doc[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="tools/train_net.py output folder")
    p.add_argument("--weights", help="checkpoint in (or path outside) the folder (default model_best.pth)")
    p.add_argument("--input", required=True, help="folder of PNG slices, data set folder, NIfTI file or DICOM folder")
    p.add_argument("--out", help="output .csv/.csv.gz (slices) or .nii/.nii.gz (volume); slices may go to "
                                  "--instances alone")
    p.add_argument("--threshold", type=float, help="instance score threshold (default: the model's config)")
    p.add_argument("--min-area", type=int, help="drop instances smaller than this many pixels")
    p.add_argument("--fallback-top-k", type=int, help="instances kept below the threshold when none passes")
    p.add_argument("--flip-tta", action="store_true", help="fuse predictions on each slice and its mirror image")
    p.add_argument("--fp32", action="store_true",
                   help="predict in float32 even where the model's config has D2CT.CPU_BF16 on (= D2CT.CPU_BF16 False)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--list", metavar="FILE", help="predict only the slices named in FILE (one file name per line)")
    p.add_argument("--instances", metavar="FILE.json",
                   help="save every instance (score + RLE mask) before flattening, e.g. for mask AP or to "
                        "flatten again at another threshold without the model")
    p.add_argument("--viz", metavar="DIR", help="write overlays (slice | prediction | truth) here; for a volume "
                                               "an axial / coronal / sagittal overlay")
    p.add_argument("--viz-count", type=int, default=12, help="slices shown in the overlays")
    p.add_argument("--truth", help="labels CSV of the input slices (for a volume: a NIfTI label volume on its "
                                   "grid): adds truth to overlays and prints scores")
    p.add_argument("--level", type=float, default=40.0, help="volume input: HU window level")
    p.add_argument("--width", type=float, default=400.0, help="volume input: HU window width")
    p.add_argument("--size", type=int, default=0,
                   help="volume input: resample slices to SIZE x SIZE square pixels as the model was trained "
                        "(e.g. 256), predict, and map the labels back to the volume's grid (0 = native size)")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine (GPUs, or CPU processes)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    add_linking_arguments(p)
    return p


def _is_volume(path: Path) -> bool:
    if path.name.endswith((".nii", ".nii.gz")):
        return True
    return path.is_dir() and not any(path.glob("*.png")) and not any(
        (path / s).is_dir() for s in ("test-images", "images", "train-images"))


def run(args):
    """One prediction process; ``launch`` starts one per GPU / CPU process."""
    source = Path(args.input)
    if not args.out and (_is_volume(source) or not args.instances):
        raise DataError("--out is needed (--instances alone is enough only for slices)")
    for option, path, kind in (("--out", args.out, "file"), ("--instances", args.instances, "file"),
                               ("--viz", args.viz, "dir")):
        check_writable(path, kind=kind, option=option)  # before the model runs
    setup_logger(name="d2ct")
    setup_logger()
    if args.fp32:
        args.opts = [*args.opts, "D2CT.CPU_BF16", "False"]
    cfg, weights = load_trained(args.model, args.weights, args.opts)
    options = PostprocessOptions.from_cfg(cfg, score_threshold=args.threshold, min_area=args.min_area,
                                          fallback_top_k=args.fallback_top_k)
    link_options = link_options_from_args(args)
    predictor = BatchPredictor(cfg, weights, batch_size=args.batch_size, flip_tta=args.flip_tta)
    if _is_volume(source):
        from d2ct.data.volumes import load_volume, window

        volume = load_volume(source)
        truth = None
        if args.truth:  # read first: a bad file fails before the model runs
            from d2ct.data.volumes import load_label_volume

            truth = load_label_volume(args.truth, volume)
        hu, geometry = volume.hu, None
        if args.size:
            from d2ct.data.volumes import resample_slices

            hu, geometry = resample_slices(volume.hu, volume.spacing[1:], args.size)
        slices = window(hu, args.level, args.width)
        named = [(f"slice_{z:04d}", np.repeat(s[:, :, None], 3, axis=2)) for z, s in enumerate(slices)]
        if comm.get_world_size() > 1 and comm.get_rank() > 0:
            return  # volumes are predicted by one process
        preds = [p.compact() for p in predictor.predict_images(named, progress=True, total=len(named))]
        label_maps, scores = label_maps_with_scores(preds, options)
        if geometry is not None:
            from d2ct.data.volumes import restore_slices

            label_maps = restore_slices(label_maps, geometry)
        done = write_volume_prediction(label_maps, volume, args.out, scores=scores, link=not args.per_slice_labels,
                                       options=link_options, viz=args.viz, truth=truth,
                                       meta={"model": prediction_source(weights, args.flip_tta, args.opts)})
        kind = "per-slice labels" if args.per_slice_labels else "3-D structures"
        print(f"{len(named)} slices, {done['n_structures']} {kind} -> "
              f"{', '.join(str(p) for p in done['paths'].values())}")
        if done["scores"] is not None:
            from d2ct.evaluation.volume_metrics import VolumeScores, format_volume_scores

            print(format_volume_scores(VolumeScores(done["scores"]), title=f"3-D scores against {args.truth}"))
        return
    folder, names = find_slices(source)
    if args.list:
        names = _read_list(args.list, names, folder)
    preds = predictor.predict_files_sharded([(n, str(folder / n)) for n in names])
    if not comm.is_main_process():
        return
    if args.instances:
        save_instances(args.instances, preds, prediction_source(weights, args.flip_tta, args.opts))
    print(f"{len(names)} slices -> {', '.join(str(f) for f in (args.out, args.instances) if f)}")
    if not (args.out or args.truth or args.viz):
        return
    if args.link_slices:  # one scan, slices in name order
        label_maps = link_slice_folder(*label_maps_with_scores(preds, options), link_options)
    else:
        label_maps = label_maps_from_predictions(preds, options)
    if args.out:
        write_submission(args.out, names, label_maps)
    truth = _read_truth(args.truth, names, label_maps.shape[1:]) if args.truth else None
    if truth is not None:
        from d2ct.evaluation.report import evaluate_label_maps, format_summary

        result = evaluate_label_maps(names, truth, label_maps)
        print(format_summary(result.summary, title=f"scores against {args.truth}"))
    if args.viz:
        _write_overlays(args.viz, folder, names, label_maps, truth, args.viz_count)


def _read_list(path, available, folder):
    try:
        wanted = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise DataError(f"--list {path}: {e.strerror}") from None
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise DataError(f"--list {path}: {len(missing)} name(s) are not slices of {folder}, e.g. {missing[0]}")
    return wanted


def _read_truth(path, names, shape):
    from d2ct.data.labels_csv import read_labels_csv

    table = read_labels_csv(path, expected_pixels=shape[0] * shape[1])
    return np.stack([table.label_map(n, shape) for n in names])


def _write_overlays(out_dir, folder, names, label_maps, truth, count):
    from d2ct.visualization.overlay import comparison_grid

    out_dir = Path(out_dir)
    step = max(1, len(names) // max(1, count))
    rows = [(read_model_image(str(folder / names[i])), label_maps[i], None if truth is None else truth[i],
             f"{names[i]} ({int(label_maps[i].max())} structures)") for i in range(0, len(names), step)[:count]]
    path = comparison_grid(rows, out_dir / "predictions.png", title=f"predictions ({len(rows)} of {len(names)} slices)")
    print(f"overlays -> {path}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return launch_cli(run, args)


if __name__ == "__main__":
    sys.exit(main())
