"""The ``D2CT.*`` config keys, added to a Detectron2 config as PointRend's ``add_pointrend_config`` does."""
from detectron2.config import CfgNode as CN


def add_d2ct_config(cfg: CN) -> CN:
    """Add d2ct's keys (with their defaults) to a Detectron2 config, in place; returns it."""
    _C = cfg
    _C.D2CT = CN()

    # Data: one data set folder in the challenge layout is registered under DATA_NAME, giving
    # <DATA_NAME>_train / _val / _labelled / _unlabelled / _test for DATASETS.TRAIN and TEST.
    _C.D2CT.DATA_NAME = "phantom"
    _C.D2CT.DATA_ROOT = "datasets/phantom"
    _C.D2CT.VAL_FRACTION = 0.2  # seeded split of the labelled images into train / val
    _C.D2CT.SPLIT_SEED = 0
    # A manifest column (e.g. "patient") whose groups the train/val split keeps whole, so no patient
    # has slices on both sides; "" splits image by image. MANIFEST: default <DATA_ROOT>/manifest.csv.
    _C.D2CT.SPLIT_GROUP_BY = ""
    _C.D2CT.MANIFEST = ""
    # A split file (splits_final.json, written once by the pipeline's data stage): its train / val /
    # unlabelled / test names are used as they are; VAL_FRACTION, SPLIT_SEED and SPLIT_GROUP_BY are
    # then ignored. "" computes the split from those keys.
    _C.D2CT.SPLIT_FILE = ""
    _C.D2CT.SPLIT_COMPONENTS = False  # one instance per connected component instead of per label
    _C.D2CT.MIN_AREA = 0  # instances below this many pixels are dropped from training data
    # Pseudo-labelled sets (COCO JSON written by tools/pseudolabel.py), registered as
    # <DATA_NAME>_pseudo, <DATA_NAME>_pseudo1, ... in the order given.
    _C.D2CT.PSEUDO_LABELS = []
    # Crowd annotations (iscrowd 1; tools/pseudolabel.py --ignore-below writes the uncertain
    # pseudo-labels so) are ignore regions: the ROI heads sample no proposal matched to them, as
    # neither structure nor background. False drops them, as Detectron2's DatasetMapper does.
    _C.D2CT.CROWD_AS_IGNORE = True
    # What a pseudo-labelled slice teaches where its teachers drew nothing: "background" (Detectron2's
    # sampling: every structure the teachers missed is learnt as background) or "ignore" (anchors and
    # proposals there are sampled neither as object nor as background; d2ct.modeling.pseudo_negatives).
    _C.D2CT.PSEUDO_NEGATIVES = "background"
    # With "ignore": the share (0-1) of a pseudo-labelled slice's sampled background anchors and
    # proposals still taught as background, picked at random (keeps the student's scores calibrated).
    _C.D2CT.PSEUDO_NEGATIVES_KEEP = 0.0

    # Augmentation suited to CT slices. Intensity jitter is limited to +-10% (it would change what
    # a grey level means in HU) unless UNRESTRICTED_INTENSITY is set.
    _C.D2CT.AUGMENT = CN()
    _C.D2CT.AUGMENT.ENABLED = True
    _C.D2CT.AUGMENT.HFLIP = True  # left/right flip: anatomy is roughly symmetric
    _C.D2CT.AUGMENT.VFLIP = False  # anterior/posterior flip: off, anatomy is not symmetric that way
    _C.D2CT.AUGMENT.ROTATION = 10.0  # degrees, uniform in [-ROTATION, ROTATION]; 0 disables
    _C.D2CT.AUGMENT.BRIGHTNESS = [0.95, 1.05]  # multiplicative, [1, 1] disables
    _C.D2CT.AUGMENT.CONTRAST = [0.95, 1.05]
    _C.D2CT.AUGMENT.UNRESTRICTED_INTENSITY = False
    # The student's strong augmentation (Noisy Student; d2ct.data.augment): off by default. On, it
    # replaces the policy above for pseudo-labelled slices (APPLY_TO "pseudo": annotations with a
    # teacher's score) or for every slice ("all"). Sizes and displacements are fractions of the
    # image side; probabilities are per slice.
    _C.D2CT.AUGMENT.STUDENT = CN()
    _C.D2CT.AUGMENT.STUDENT.ENABLED = False
    _C.D2CT.AUGMENT.STUDENT.APPLY_TO = "pseudo"
    _C.D2CT.AUGMENT.STUDENT.SCALE = [0.5, 2.0]  # large scale jitter around max(INPUT.MIN_SIZE_TRAIN), then crop/pad
    _C.D2CT.AUGMENT.STUDENT.ROTATION = 20.0  # degrees
    _C.D2CT.AUGMENT.STUDENT.ELASTIC_PROB = 0.5
    _C.D2CT.AUGMENT.STUDENT.ELASTIC_MAGNITUDE = 0.02  # largest displacement
    _C.D2CT.AUGMENT.STUDENT.ELASTIC_SIGMA = 0.06  # smoothness of the displacement field
    _C.D2CT.AUGMENT.STUDENT.GAMMA = [0.8, 1.25]  # moves a grey level by at most 8% of the window
    _C.D2CT.AUGMENT.STUDENT.BRIGHTNESS = [0.9, 1.1]
    _C.D2CT.AUGMENT.STUDENT.CONTRAST = [0.9, 1.1]
    _C.D2CT.AUGMENT.STUDENT.NOISE_PROB = 0.5
    _C.D2CT.AUGMENT.STUDENT.NOISE_STD = 6.0  # grey levels (largest standard deviation)
    _C.D2CT.AUGMENT.STUDENT.BLUR_PROB = 0.3
    _C.D2CT.AUGMENT.STUDENT.BLUR_SIGMA = 1.0  # pixels (largest)
    _C.D2CT.AUGMENT.STUDENT.CUTOUT_PROB = 0.5
    _C.D2CT.AUGMENT.STUDENT.CUTOUT_HOLES = 3
    _C.D2CT.AUGMENT.STUDENT.CUTOUT_SIZE = 0.15
    # structures of a human-labelled training slice pasted onto the slice (Ghiasi et al. 2021)
    _C.D2CT.AUGMENT.STUDENT.COPY_PASTE_PROB = 0.5

    # Model noise for a student (Noisy Student; d2ct.modeling.model_noise), on top of the strong
    # augmentation: stochastic depth in the ResNet backbone (a residual block's branch dropped per
    # image, with a probability growing linearly with depth to DROP_PATH at the last block) and
    # dropout after the box head's fully connected layers. Training only; 0 (the default) is off.
    # Parameter names do not change: checkpoints load with or without it.
    _C.D2CT.MODEL_NOISE = CN()
    _C.D2CT.MODEL_NOISE.DROP_PATH = 0.0
    _C.D2CT.MODEL_NOISE.BOX_HEAD_DROPOUT = 0.0

    # Online teacher-student training (d2ct.engine.mean_teacher): an EMA of the student labels
    # weak views of the pool each step, the student learns them on strong views (the student policy
    # above, which must be ENABLED). Off by default; the offline pseudo-labels are the method's.
    _C.D2CT.MEAN_TEACHER = CN()
    _C.D2CT.MEAN_TEACHER.ENABLED = False
    _C.D2CT.MEAN_TEACHER.UNLABELLED_DATASETS = ()  # e.g. ("openkbp_unlabelled",)
    _C.D2CT.MEAN_TEACHER.EMA_DECAY = 0.999
    _C.D2CT.MEAN_TEACHER.SCORE_THRESHOLD = 0.7  # a teacher's instance becomes a target from this score
    _C.D2CT.MEAN_TEACHER.UNSUP_WEIGHT = 1.0  # times each unlabelled loss
    # Unbiased Teacher's choice: classification only (pseudo boxes are too rough to regress to);
    # the mask loss teaches the student the teacher's outlines
    _C.D2CT.MEAN_TEACHER.UNSUP_LOSSES = ["loss_rpn_cls", "loss_cls", "loss_mask"]
    _C.D2CT.MEAN_TEACHER.BURN_IN_ITERS = 0  # labelled-only steps first (0 for a warm start)
    _C.D2CT.MEAN_TEACHER.MIN_AREA = 5  # pixels a pseudo-instance keeps in the strong view

    # Turning instances into one label map per slice (evaluation, prediction, submission).
    _C.D2CT.POSTPROCESS = CN()
    _C.D2CT.POSTPROCESS.SCORE_THRESHOLD = 0.5
    _C.D2CT.POSTPROCESS.MIN_AREA = 5
    _C.D2CT.POSTPROCESS.FALLBACK_TOP_K = 3  # never leave a slice empty when the model saw something

    # Validation during training: the best checkpoint by this metric becomes model_best.pth with
    # its scores in model_best.json (read by the pseudo-labelling stage to weigh the radiologists).
    _C.D2CT.BEST_METRIC = "segm/AP"
    # Periodic checkpoints (SOLVER.CHECKPOINT_PERIOD) kept on disk, newest first; 0 keeps all.
    # model_final.pth and model_best.pth are always kept.
    _C.D2CT.CHECKPOINTS_TO_KEEP = 3
    _C.D2CT.CURVES = True  # training_curves.png at the end of training
    _C.D2CT.ROLE = ""  # free text shown in logs and reports ("quick", "balanced", "detail", "final")

    # CPU speed (d2ct.engine.precision): bfloat16 autocast for training, evaluation and prediction
    # where the CPU computes bfloat16 natively (avx512_bf16 / amx_bf16; float32 elsewhere, said
    # once in the log); the weights, gradients, GroupNorm, softmax, losses and the score / box /
    # mask logit layers stay float32. CHANNELS_LAST: NHWC convolutions on the CPU. Prediction reads
    # both from the model's config.yaml (tools/predict.py --fp32 turns bfloat16 off).
    _C.D2CT.CPU_BF16 = True
    _C.D2CT.CHANNELS_LAST = True
    # Prediction (BatchPredictor: tools/predict.py, pseudo-labelling, the pipeline) runs the mask
    # head only on detections scored at least PREDICT_SCORE_FLOOR, plus each slice's
    # PREDICT_KEEP_TOP_K best whatever their score (so the fallback of D2CT.POSTPROCESS.FALLBACK_TOP_K
    # still finds them); the mask head over every detection dominates CPU inference. Keep the floor
    # below every threshold used downstream (pipeline predict.threshold_grid starts at 0.3,
    # pseudolabel.ignore_below). 0 keeps Detectron2's MODEL.ROI_HEADS.SCORE_THRESH_TEST alone.
    # Training-time validation (mask AP) is not affected.
    _C.D2CT.PREDICT_SCORE_FLOOR = 0.2
    _C.D2CT.PREDICT_KEEP_TOP_K = 5

    # Use ImageNet-pretrained backbones when MODEL.WEIGHTS names them; stop with a clear message
    # when they cannot be fetched (see d2ct.engine.weights).
    _C.D2CT.CHECK_WEIGHTS = True
    return cfg
