"""Constants shared by every part of the pipeline (values fixed by the reference implementation)."""

RGB_SIZE = 224  # RGB images and GT masks are always resized to this, independent of --img_size
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MVTEC3D_CLASSES = (
    "bagel", "cable_gland", "carrot", "cookie", "dowel",
    "foam", "peach", "potato", "rope", "tire",
)
EYECANDIES_CLASSES = (
    "CandyCane", "ChocolateCookie", "ChocolatePraline", "Confetto", "GummyBear",
    "HazelnutTruffle", "LicoriceSandwich", "Lollipop", "Marshmallow", "PeppermintCandy",
)
CLASSES_BY_DATASET = {"mvtec3d": MVTEC3D_CLASSES, "eyecandies": EYECANDIES_CLASSES}

PRO_THRESHOLDS = 100  # of the PRO curve behind AU-PRO in M3DM's and BTF's au_pro_util.py (CFM's: config.py)
XYZ_FEATURE_DIM = 1152  # 3 transformer stages x 384
