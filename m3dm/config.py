"""The methods as data and every setting of a run, typed, each with its default, choices and help in one place.

One module on purpose: every setting, its flag and its validation rules (with the bounds of
the numeric flags) side by side.

The command line (m3dm.app.cli), the validation of flag combinations and the fitted-model files all derive from
the dataclasses below: a setting is declared once, with ``setting(...)``. Library code receives these objects
(or plain values taken from them), never an argparse namespace.

A method (docs/original.md) is a set of modalities (``xyz``, ``rgb``, ``fusion``: one memory bank each, always in
that order) and a rule that turns their per-modality scores into the final ones (``single``, ``add`` or decision
layer fusion, ``dlf``). The reference's quirks (mixed normalisation statistics, coreset sizes, the ÷1000,
epsilons, zero-row handling) are reproduced by default and corrected with ``fix_quirks`` (docs/quirks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3dm.errors import ConfigError

MODALITIES = ("xyz", "rgb", "fusion")
CONCAT = "rgb+xyz"  # BTF's bank of RGB patches concatenated with point (FPFH) patches, no score weights of its own
BANK_ORDER = (*MODALITIES, CONCAT)  # the order banks are built in (they share numpy's global generator)
BTF_PATCH_GRID = 28  # BTF pools every feature map to 28 x 28 patches
BANK_SEARCHES = ("torch", "projected", "faiss", "hnsw", "ivf")  # --bank_search (m3dm.memory.defaults.default_search)


@dataclass(frozen=True)
class MethodSpec:
    modalities: tuple[str, ...]
    combine: str  # "single" | "add" | "dlf"
    eps: float  # epsilon of the re-weighting denominator (quirk 29)
    divisor: float = 1.0  # image-score divisor inside the re-weighting (quirk 29: DINO+Point_MAE uses 1000)
    shared_stats: bool = False  # normalise every bank with (mean of xyz, std of rgb) (quirk 26)
    own_stats: bool = False  # normalise with the bank's own statistics (DINO)
    family: str = "m3dm"  # which detector fits and scores it (m3dm.detection.factory)
    features: str = "m3dm"  # "m3dm": the ViT and point backbones; "btf": wide-ResNet-50 layers 2+3 and FPFH
    patch_grid: int | None = None  # every bank's patch grid (None: the RGB backbone's grid and PFA's 56 x 56)
    # thresholds of the PRO curve behind every AU-PRO, as the method's reference samples it (docs/quirks.md,
    # "AU-PRO"): 100 in M3DM's and BTF's au_pro_util.py (m3dm.constants.PRO_THRESHOLDS), 99 in CFM's
    pro_thresholds: int = 100

    @property
    def memory_bank(self) -> str:
        """The ``--memory_bank`` value the reference runs this method with."""
        return "multiple" if self.combine == "dlf" else "single"

    @property
    def needs_uff(self) -> bool:
        return "fusion" in self.modalities

    @property
    def needs_rgb(self) -> bool:
        return any(m in self.modalities for m in ("rgb", "fusion", CONCAT))

    @property
    def needs_xyz(self) -> bool:
        return any(m in self.modalities for m in ("xyz", "fusion", CONCAT))


METHODS: dict[str, MethodSpec] = {
    "DINO": MethodSpec(("rgb",), "single", eps=1e-5, own_stats=True),
    "Point_MAE": MethodSpec(("xyz",), "single", eps=1e-5),
    "Fusion": MethodSpec(("fusion",), "single", eps=0.0),
    "DINO+Point_MAE": MethodSpec(("xyz", "rgb"), "dlf", eps=0.0, divisor=1000.0, shared_stats=True),
    "DINO+Point_MAE+add": MethodSpec(("xyz", "rgb"), "add", eps=0.0, shared_stats=True),
    "DINO+Point_MAE+Fusion": MethodSpec(("xyz", "rgb", "fusion"), "dlf", eps=0.0, shared_stats=True),
    # BTF (Horwitz & Hoshen, 3D-ADS): PatchCore on unnormalised patches, re-weighting without epsilon
    "BTF_RGB": MethodSpec(("rgb",), "single", eps=0.0, features="btf", patch_grid=BTF_PATCH_GRID),
    "BTF_FPFH": MethodSpec(("xyz",), "single", eps=0.0, features="btf", patch_grid=BTF_PATCH_GRID),
    "BTF_RGB+FPFH": MethodSpec((CONCAT,), "single", eps=0.0, features="btf", patch_grid=BTF_PATCH_GRID),
    # crossmodal feature mapping (Costanzino et al., CVPR 2024): no banks, two MLPs (m3dm.detection.cfm)
    "CFM": MethodSpec(("xyz", "rgb"), "cfm", eps=0.0, family="cfm", pro_thresholds=99),
    # G2SF (Tao et al., ICCV 2025): M3DM's two banks, fused by a learned local distance (m3dm.detection.g2sf)
    "G2SF": MethodSpec(("xyz", "rgb"), "g2sf", eps=1e-5, family="g2sf"),
}
# --save_feature dumps UFF pretraining input, which the two methods with exactly an xyz and an rgb bank produce
FEATURE_DUMP_METHODS = tuple(name for name, spec in METHODS.items()
                             if spec.family == "m3dm" and spec.modalities == ("xyz", "rgb"))
RGB_BACKBONES = ("vit_base_patch8_224_dino", "vit_base_patch8_224", "vit_base_patch8_224_in21k",
                 "vit_small_patch8_224_dino")
POINT_BACKBONES = ("Point_MAE", "Point_Bert")

REFERENCE = "reference flags (same names and defaults as the original main.py)"
ADDED = "added flags"
SAVED = "saved models and pass/fail thresholds (docs/inference.md)"
CFM = "CFM (--method_name CFM): its two feature-mapping MLPs; defaults are its reference's (docs/quirks.md)"
G2SF = ("G2SF (--method_name G2SF): pseudo-anomalies and the local scale prediction network; names and defaults "
        "are its reference's (docs/g2sf.md; its reference runs Point-MAE with --num_group 512)")
G2SF_SCORING_MODES = ("min", "max", "average", "zero")


def setting(default: Any, help: str = "", *, flag: bool = True, type: type | None = None,
            choices: tuple | None = None, group: str = REFERENCE, recorded: bool = False,
            aliases: tuple[str, ...] = (), **argparse_options: Any):
    """A dataclass field that is also a command-line flag ``--<name>`` (``flag=False``: no flag; ``aliases``:
    more option strings for it).

    ``recorded``: the value changes scores (or the fit a loaded model replaces), so a fitted-model file stores it
    and a run that loads the model must have the same value. Booleans become ``store_true`` flags; other extra
    keyword arguments go to ``argparse.add_argument``.
    """
    metadata = {"flag": flag, "help": help, "type": type, "choices": choices, "group": group,
                "recorded": recorded, "aliases": aliases, "argparse": argparse_options}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ScoreWeights:
    """The lambdas that weight each modality's image score and map before decision layer fusion."""

    xyz_s_lambda: float = setting(1.0, "weight of the xyz bank's image score before decision layer fusion")
    xyz_smap_lambda: float = setting(1.0, "weight of the xyz bank's anomaly map before decision layer fusion")
    rgb_s_lambda: float = setting(0.1, "weight of the RGB bank's image score before decision layer fusion")
    rgb_smap_lambda: float = setting(0.1, "weight of the RGB bank's anomaly map before decision layer fusion")
    fusion_s_lambda: float = setting(1.0, "weight of the fusion bank's image score before decision layer fusion")
    fusion_smap_lambda: float = setting(1.0, "weight of the fusion bank's anomaly map before decision layer fusion")

    def of(self, modality: str) -> tuple[float, float]:
        """``(image-score weight, map weight)`` of one modality."""
        return getattr(self, f"{modality}_s_lambda"), getattr(self, f"{modality}_smap_lambda")

    def as_record(self) -> dict[str, list[float]]:
        """The fitted-model file's layout: ``{modality: [image weight, map weight]}``."""
        return {m: list(self.of(m)) for m in MODALITIES}

    @classmethod
    def from_record(cls, record: dict) -> ScoreWeights:
        values = {}
        for modality, (image, pixel) in record.items():
            values[f"{modality}_s_lambda"], values[f"{modality}_smap_lambda"] = float(image), float(pixel)
        return cls(**values)


@dataclass(frozen=True)
class DetectorSettings:
    """Every setting that changes the scores of a fitted detector (stored in a fitted-model file as ``config``)."""

    method_name: str = setting("DINO+Point_MAE+Fusion", "the method: its banks and how their scores combine "
                                                        "(docs/original.md)", choices=tuple(METHODS))
    memory_bank: str = setting("multiple", "multiple: decision layer fusion (second pass + one-class SVMs)",
                               choices=("single", "multiple"))
    f_coreset: float = setting(0.1, "coreset fraction")
    coreset_eps: float = setting(0.9, "eps of the sparse random projection")
    random_state: int | None = setting(None, "seed of the sparse random projection", type=int)
    asy_memory_bank: int | None = setting(
        None, "DINO+Point_MAE+Fusion: build the xyz and fusion banks from the first N samples only", type=int)
    rm_zero_for_project: bool = setting(False, "Point_MAE: drop empty patches before the coreset, then add one "
                                               "zero row")
    ocsvm_nu: float = setting(0.5, "nu of the decision layer fusion's one-class SVMs")
    ocsvm_maxiter: int = setting(1000, "iteration cap of the decision layer fusion's one-class SVMs")
    lambdas: ScoreWeights = field(default_factory=ScoreWeights)
    fix_quirks: bool = setting(False, "corrected behaviour instead of the reference's (see docs/quirks.md)",
                               group=ADDED)
    coreset_fp16: bool = setting(True, flag=False)  # the reference's float16 coreset distances
    coreset_shards: int = setting(
        1, "faster coreset: S contiguous blocks of the bank, each with its own greedy selection (faster; default "
           "1 = the reference's exact selection; it lowers the localisation metrics, see benchmarks/README.md)",
        group=ADDED, metavar="S")
    coreset_shard_rows: int | None = setting(
        None, "approximate, for large classes: exact copies dropped, then one greedy selection per block of at most "
              "R distinct bank rows, all blocks at once on their precomputed distances (linear in the class size; "
              "default: the reference's exact selection; docs/approximate.md)", type=int, group=ADDED, metavar="R")
    fusion_samples: int | None = setting(
        None, "approximate, for large classes: pass 2 scores and the decision layer fusion fits on M evenly spaced "
              "training samples only (the banks keep every sample; default: all of them; docs/approximate.md)",
        type=int, group=ADDED, metavar="M")
    bank_search: str = setting(
        "torch", "nearest-neighbour search of the memory banks (pass 2 and test scoring): torch, exact, the "
                 "reference's numbers; projected, exact, the same numbers, screened in 64 principal directions "
                 "(fewer multiply-adds; docs/approximate.md); faiss, exact through faiss on the CPU (faster; "
                 "distances equal to float32 rounding, so scores may differ in the last digits); hnsw, "
                 "approximate (faiss's HNSW graph: faster on large banks, lowers the metrics; docs/approximate.md); "
                 "ivf, approximate (faiss's inverted lists: a quick build, for large classes; docs/approximate.md)",
        choices=BANK_SEARCHES, group=ADDED)
    bank_rows_per_sample: int | None = setting(
        None, "approximate: build each memory bank from at most N patches per training sample, evenly spaced (a "
              "sample's empty patches count as one); the coreset keeps --f_coreset of those (default: every "
              "patch; docs/approximate.md)", type=int, group=ADDED, metavar="N")
    cfm_epochs: int = setting(50, "training epochs of the two mapping MLPs (the reference's training default; "
                                  "its published checkpoints used 250)", group=CFM)
    cfm_batch_size: int = setting(4, "training samples per optimisation step", group=CFM)
    cfm_lr: float = setting(1e-3, "Adam learning rate", group=CFM)
    cfm_seed: int = setting(115, "seed of the MLPs' initial weights and of the per-epoch shuffling", group=CFM)
    cfm_train_samples: int | None = setting(
        None, "few-shot setting: train on the first N training samples only (default: all of them; --max_sample "
              "is M3DM's bank cap and does not apply to CFM)", type=int, group=CFM, metavar="N")
    num_normal: int = setting(0, "augmented normal samples added to the fusion dataset", group=G2SF)
    num_anomalies: int = setting(800, "pseudo-anomalous samples synthesised per class", group=G2SF)
    fusion_batch_size: int = setting(8192, "LSPN batch (at most 0.7 x fusion patches / 20)", group=G2SF)
    lr: float = setting(1.5e-4, "Adam learning rate of the LSPN", group=G2SF)
    max_epoch: int = setting(80, "LSPN training epochs", group=G2SF)
    emb_dim: int = setting(128, "width of each LSPN branch's output", group=G2SF)
    n_hidden: str = setting("512", "hidden widths of each LSPN branch, comma-separated", group=G2SF)
    drop_out: float = setting(0.5, "dropout of the LSPN", group=G2SF)
    perc: float = setting(1.0, "quantile of the normal distances in the margin loss", group=G2SF)
    alpha: float = setting(2.0, "exponent of the separation loss's weights", group=G2SF)
    anchor: int = setting(5, "coreset neighbours of the consistency loss (and anchor + 1 scored per patch)",
                          group=G2SF)
    magnitude: float = setting(1.2, "slack of the consistency loss", group=G2SF)
    margin: float = setting(10.0, "weight of the margin loss", group=G2SF)
    const: float = setting(40.0, "weight of the consistency loss", group=G2SF)
    perm: float = setting(20.0, "weight of the permutation loss", group=G2SF)
    scaling: float = setting(3.0, "weight of the scaling loss", group=G2SF)
    scoring_mode: str = setting("min", "how a patch's fused distances to its anchor + 1 nearest coreset rows "
                                       "become its score", choices=G2SF_SCORING_MODES, group=G2SF)
    l2: float = setting(0.0, "weight of the L2 penalty on the LSPN's weights", group=G2SF)
    l1: float = setting(5e-4, "weight of the L1 penalty on the LSPN's weights", group=G2SF)

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method_name]

    @property
    def blur(self) -> str:
        """The segmentation-map blur: the reference's 8-bit Pillow blur, or a float Gaussian with fix_quirks."""
        return "float" if self.fix_quirks else "pil"

    @property
    def uses_dlf(self) -> bool:
        return self.memory_bank == "multiple" and self.spec.combine == "dlf"

    def to_record(self) -> dict:
        """Plain values in the fitted-model file's layout (``lambdas`` as ``{modality: [s, smap]}``)."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        record["lambdas"] = self.lambdas.as_record()
        return record

    @classmethod
    def from_record(cls, record: dict) -> DetectorSettings:
        values = dict(record)
        values["lambdas"] = ScoreWeights.from_record(values["lambdas"])
        return cls(**values)


@dataclass(frozen=True)
class BackboneSettings:
    """Which backbones, from which weights, and how they run."""

    rgb_backbone_name: str = setting("vit_base_patch8_224_dino",
                                     f"timm ViT name; reference choices: {', '.join(RGB_BACKBONES)}",
                                     recorded=True)
    xyz_backbone_name: str = setting("Point_MAE", "point (xyz) backbone", choices=POINT_BACKBONES, recorded=True)
    group_size: int = setting(
        128, "points per group of the point backbone: 2 to min(S*S, 1048576 / num_group), where S*S is the "
             "--img_size grid the cloud is resampled to (a group cannot hold more points than the cloud, each "
             "grouped point carries 512 float32 channels through the encoder; one point is its centre alone)",
        recorded=True)
    num_group: int = setting(
        1024, "groups (tokens) of the point backbone: 1 to 8192 (the transformer attends over all groups, so its "
              "memory grows with num_group squared: 8192 groups need about 1.6 GB per sample and layer)",
        recorded=True)
    img_size: int = setting(224, "side of the square RGB image and point grid the backbones see", recorded=True)
    rgb_checkpoint: str | None = setting(None, "RGB backbone weights (default: under checkpoints/)", type=str,
                                         group=ADDED)
    xyz_checkpoint: str | None = setting(None, "point backbone weights (default: under checkpoints/)", type=str,
                                         group=ADDED)
    random_init: bool = setting(False, "run with random backbone weights when no checkpoint is found (demos and "
                                       "tests only)", group=ADDED)
    backbone_eval: bool = setting(False, "run the point backbone in eval mode (the reference runs it in train "
                                         "mode: BatchNorm batch statistics and active DropPath)",
                                  group=ADDED, recorded=True)
    precision: str = setting("fp32", "bf16: bfloat16 matrix products in the backbones (faster, features within "
                                     "~1 %% of fp32; default fp32 for parity with the reference)",
                             choices=("fp32", "bf16"), group=ADDED, recorded=True)


@dataclass(frozen=True)
class UFFSettings:
    """The Unsupervised Feature Fusion block the Fusion methods need."""

    use_uff: bool = setting(False, "load the UFF block (needed by the Fusion methods)", recorded=True)
    fusion_module_path: str = setting("checkpoints/checkpoint-0.pth", "UFF checkpoint")


@dataclass(frozen=True)
class RunSettings:
    """What to run on, where the outputs go, and how the work is carried out."""

    dataset_type: str = setting("mvtec3d", "layout of --dataset_path", choices=("mvtec3d", "eyecandies"))
    dataset_path: str = setting("datasets/mvtec3d", "root of the preprocessed dataset (one folder per class)")
    max_sample: int = setting(400, "training-sample cap per pass; the reference uses max_sample + 1 samples",
                              recorded=True)
    save_feature: bool = setting(False, "dump per-sample features for UFF pretraining")
    save_feature_path: str = setting("datasets/patch_lib", "folder of the --save_feature dumps")
    save_preds: bool = setting(False, "save one picture per test sample")
    classes: Sequence[str] | None = setting(None, "run only these classes", type=str, group=ADDED, nargs="+")
    device: str = setting("auto", "cpu, cuda, cuda:N or auto", group=ADDED)
    batch_size: int = setting(1, "samples per extraction batch", group=ADDED)
    num_workers: int = setting(0, "data-loading processes", group=ADDED)
    output_dir: str = setting("results", "tables, JSON, pictures and saved models", group=ADDED)
    seed: int = setting(0, "seed set for every class, as the reference does", group=ADDED, recorded=True)
    dlf_reextract: bool = setting(False, "pass 2 extracts the training samples again as the reference does "
                                         "(default: reuse the pass-1 features; identical in eval mode, see "
                                         "docs/quirks.md)", group=ADDED, recorded=True)
    bank_storage: str = setting("disk", "where the training patches wait for the coreset and pass 2: a temporary "
                                        "file (default; a 400-sample class needs ~16 GB there instead of in RAM) "
                                        "or host memory", choices=("disk", "memory"), group=ADDED)
    spool_dir: str | None = setting(None, "folder of the --bank_storage disk file (default: the system's "
                                          "temporary folder)", type=str, group=ADDED)
    save_maps: bool = setting(False, "write every test part's 224x224 float map, image score and label to "
                                     "<output_dir>/maps/<class>.npz (compare two runs pixel by pixel)",
                              group=ADDED)
    resume: bool = setting(False, "skip the classes an earlier run with the same settings finished in "
                                  "<output_dir>/classes/<class>.json (each class's results are written there as "
                                  "it ends)", group=ADDED)
    demo: bool = setting(False, "generate synthetic data if absent and run DINO+Point_MAE (or --method_name) on it",
                         group=ADDED)
    demo_root: str = setting("datasets", "where --demo writes its synthetic data", group=ADDED)
    g2sf_full_dataset_path: str | None = setting(
        None, "the unpreprocessed dataset whose clouds give pasted points their x and y (default: the "
              "preprocessed clouds, as the reference's Eyecandies setting)", type=str, group=G2SF)
    g2sf_anomaly_source: str | None = setting(
        None, "JSON list of point-cloud anomaly sources (default: 8 training clouds per class of the dataset, 24 "
              "for Eyecandies, chosen as the reference's create_anomaly_source.py)", type=str, group=G2SF)

    @property
    def spool_folder(self) -> str | None:
        """The folder of the banks' temporary file, or None to keep the training patches in memory."""
        if self.bank_storage == "memory":
            return None
        return self.spool_dir or tempfile.gettempdir()


@dataclass(frozen=True)
class ModelFileSettings:
    """Saving a fitted class model with pass/fail thresholds, or evaluating with a saved one."""

    save_model: bool = setting(False, "after fitting a class, set its pass/fail thresholds on good parts "
                                      "(validation/good) and save it to <output_dir>/models/<class>.pt",
                               group=SAVED)
    load_model: str | None = setting(None, "skip fitting: load <FOLDER>/<class>.pt (default FOLDER: "
                                           "<output_dir>/models) and evaluate with it; the run's flags and weight "
                                           "files must match the model's", type=str, group=SAVED, nargs="?",
                                     const="", metavar="FOLDER")
    far: float = setting(0.01, "--save_model: fraction of good parts allowed above the image threshold",
                         group=SAVED)
    pixel_far: float = setting(0.01, "--save_model: fraction of good parts' pixels allowed above the pixel "
                                     "threshold", group=SAVED)


@dataclass(frozen=True)
class Settings:
    """Everything ``main.py`` is told, grouped by concern."""

    detector: DetectorSettings = field(default_factory=DetectorSettings)
    backbones: BackboneSettings = field(default_factory=BackboneSettings)
    uff: UFFSettings = field(default_factory=UFFSettings)
    run: RunSettings = field(default_factory=RunSettings)
    models: ModelFileSettings = field(default_factory=ModelFileSettings)

    def replace(self, **changes: dict[str, Any]) -> Settings:
        """A copy with some leaves changed: ``settings.replace(run={"classes": [...]})``."""
        return dataclasses.replace(self, **{group: dataclasses.replace(getattr(self, group), **values)
                                            for group, values in changes.items()})

    def flags(self) -> dict[str, Any]:
        """Every setting by its flag name (a run's record in ``results.json``)."""
        return {name: value for name, value, _ in _leaves(self)}

    def recorded(self) -> dict[str, Any]:
        """The recorded settings outside the detector's (``settings`` in a fitted-model file), and fix_quirks."""
        values = {name: value for name, value, meta in _leaves(self) if meta["recorded"]}
        values["fix_quirks"] = self.detector.fix_quirks
        return values

    def scoring(self) -> dict[str, Any]:
        """By flag name, the settings that change a fitted detector's numbers: the detector's and the recorded
        ones (output flags such as --save_maps are not among them)."""
        return {**{name: value for name, value, _ in _leaves(self.detector)}, **self.recorded()}

    def validate(self) -> None:
        validate(self)


# ---------------------------------------------------------------------------------------- the leaves

def _leaves(settings) -> list[tuple[str, Any, Mapping[str, Any]]]:
    """``(name, value, metadata)`` of every flag-bearing leaf, depth first in declaration order."""
    out = []
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            out += _leaves(value)
        elif f.metadata.get("flag"):
            out.append((f.name, value, f.metadata))
    return out


def _build(cls, values: dict[str, Any]):
    """An instance of the settings dataclass ``cls`` with leaves taken from ``values`` (by flag name)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if nested is not None and isinstance(nested, type) and dataclasses.is_dataclass(nested):
            kwargs[f.name] = _build(nested, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def settings_from_flags(values: dict[str, Any] | argparse.Namespace) -> Settings:
    """Settings from parsed flags (a namespace or a dict by flag name); missing leaves keep their defaults. Class
    names lose the trailing slash a shell's completion of the folder name adds."""
    values = dict(vars(values) if isinstance(values, argparse.Namespace) else values)
    if values.get("classes"):
        values["classes"] = [class_name(name) for name in values["classes"]]
    return _build(Settings, values)


def class_name(name: str) -> str:
    """A class as given on a command line, without the trailing slash of a completed folder name."""
    stripped = name.rstrip("/\\")
    return stripped or name


def backbone_settings(recorded: dict[str, Any], **overrides: Any) -> BackboneSettings:
    """Backbone settings from a fitted-model file's ``settings`` (missing keys take today's defaults)."""
    names = {f.name for f in dataclasses.fields(BackboneSettings)}
    return BackboneSettings(**{k: v for k, v in {**recorded, **overrides}.items() if k in names})


def recorded_defaults() -> dict[str, Any]:
    """The value every recorded setting has by default (a fitted-model file without a key had that value)."""
    return Settings().recorded()


def add_flags(parser: argparse.ArgumentParser, settings_class=Settings) -> argparse.ArgumentParser:
    """Add one flag per leaf of ``settings_class`` to ``parser``, in groups, with its default and choices."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, default, meta in _leaves(settings_class()):
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        options = {"default": default, "help": _help_with_default(meta["help"], default), **meta["argparse"]}
        if isinstance(default, bool):
            options["action"] = "store_true"
        else:
            options["type"] = meta["type"] or type(default)
            if meta["choices"] is not None:
                options["choices"] = meta["choices"]
        group.add_argument(f"--{name}", *meta["aliases"], **options)
    return parser


def _help_with_default(text: str, default: Any) -> str | None:
    """A flag's help followed by its default, unless the help already says it or there is none to show (an off
    switch, an unset value)."""
    if isinstance(default, bool) or default is None or "default" in text:
        return text or None
    shown = str(default).replace("%", "%%")  # argparse %-formats help texts
    return f"{text} (default: {shown})" if text else f"default: {shown}"


def build_parser() -> argparse.ArgumentParser:
    """``main.py``'s command line: every flag of the reference with its name and default, and the added ones."""
    # prog: the same "main.py: error: ..." however the parser is started (a test runner's worker, a wrapper)
    return add_flags(argparse.ArgumentParser(
        prog="main.py", description="M3DM: fit and evaluate per class (MVTec 3D-AD / Eyecandies)."))


# ---------------------------------------------------------------------------------------- configuration files

CONFIG_FILE_NAME = "config.yaml"  # what every run writes to its output folder


def settings_yaml(settings: Settings) -> str:
    """Every setting as YAML, one ``flag_name: value`` line each, under a comment per group: what
    ``main.py --print_config`` prints, a run's ``config.yaml`` holds and ``read_settings`` reads back."""
    import yaml  # here: reading and writing files is the only use, and ``import m3dm.config`` stays light

    lines = ["# m3dm settings: main.py --config FILE reads them back (flags given with it override the file);",
             "# every key is a main.py flag (main.py --help explains each)"]
    for group in dataclasses.fields(settings):
        value = getattr(settings, group.name)
        summary = (type(value).__doc__ or "").strip().splitlines()[0]
        lines.append(f"\n# {group.name}: {summary}")
        for name, leaf, _ in _leaves(value):
            plain = list(leaf) if isinstance(leaf, tuple) else leaf
            lines.append(yaml.safe_dump({name: plain}, default_flow_style=False, width=10_000).rstrip("\n"))
    return "\n".join(lines) + "\n"


def read_settings_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings a YAML file gives, by flag name, checked (``checked_settings``); errors name the file."""
    import yaml

    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the configuration file ({exc.strerror or exc})") from exc
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{source}: not valid YAML{line}: {getattr(exc, 'problem', None) or exc}") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected 'setting: value' lines (main.py --print_config writes a full "
                          f"example), not a {type(values).__name__}")
    return checked_settings(values, source)


def read_settings(path: str | os.PathLike, base: Settings | None = None) -> Settings:
    """``base`` (default: every default) with the settings of a YAML file (``settings_yaml``'s layout)."""
    return settings_with(base or Settings(), read_settings_file(path))


def settings_with(base: Settings, values: Mapping[str, Any]) -> Settings:
    """``base`` with some leaves replaced, given by flag name (values as ``checked_settings`` returns them)."""
    return settings_from_flags({**base.flags(), **values})


def checked_settings(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``values`` by flag name, each checked against its declared type and choices (an integer where a float is
    declared becomes a float, a number where a string is, a string); an unknown name or a value of another type
    raises ConfigError naming ``source`` (a file, a function), the key and, for a name, the closest valid one."""
    known = _leaf_types()
    checked = {}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"{source}: unknown setting {name!r}{_did_you_mean(str(name), known)}")
        declared, meta = known[name]
        checked[name] = _checked_value(name, value, declared, meta, source)
    return checked


def _did_you_mean(name: str, valid: Collection[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else " (main.py --print_config lists every setting)"


def _leaf_types(settings_class: type = Settings) -> dict[str, tuple[Any, Mapping[str, Any]]]:
    """``{flag name: (declared type, metadata)}`` of every flag-bearing leaf."""
    out: dict[str, tuple[Any, Mapping[str, Any]]] = {}
    hints = typing.get_type_hints(settings_class)
    for f in dataclasses.fields(settings_class):
        declared = hints[f.name]
        if isinstance(declared, type) and dataclasses.is_dataclass(declared):
            out.update(_leaf_types(declared))
        elif f.metadata.get("flag"):
            out[f.name] = (declared, f.metadata)
    return out


def _checked_value(name: str, value: Any, declared: Any, meta: Mapping[str, Any], source: str) -> Any:
    args = typing.get_args(declared)
    if type(None) in args:  # ``X | None``
        if value is None:
            return None
        declared = next(arg for arg in args if arg is not type(None))
    converted = _converted(value, declared)
    if converted is _WRONG_TYPE:
        raise ConfigError(f"{source}: {name}: {value!r} is not {_type_words(declared)}")
    choices = meta["choices"]
    if choices is not None and converted not in choices:
        close = _did_you_mean(str(converted), [str(c) for c in choices]) if isinstance(converted, str) else ""
        raise ConfigError(f"{source}: {name}: {converted!r} is not one of {', '.join(map(str, choices))}{close}")
    return converted


_WRONG_TYPE = object()


def _converted(value: Any, declared: Any) -> Any:
    """``value`` as the declared type, or ``_WRONG_TYPE``."""
    if declared is bool:
        return value if isinstance(value, bool) else _WRONG_TYPE
    if isinstance(value, bool):  # YAML's true/false is no number or text
        return _WRONG_TYPE
    if declared is int:
        return value if isinstance(value, int) else _WRONG_TYPE
    if declared is float:
        if isinstance(value, (int, float)):
            return float(value)
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value) if isinstance(value, str) else _WRONG_TYPE
        except ValueError:
            return _WRONG_TYPE
    if declared is str:
        return str(value) if isinstance(value, (str, int, float)) else _WRONG_TYPE
    if typing.get_origin(declared) in (Sequence, list, tuple):  # --classes: names
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(item, str) for item in items):
            return list(items)
    return _WRONG_TYPE


def _type_words(declared: Any) -> str:
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a text"}
    return words.get(declared, "a list of names")


# ---------------------------------------------------------------------------------------- validation

def validate(settings: Settings) -> None:
    """Raise ConfigError with what to use instead, for every combination the reference cannot run."""
    for rule in (_range_rules, _class_rules, _method_rules, _option_rules, _model_file_rules, _cfm_rules,
                 _g2sf_rules):
        message = rule(settings)
        if message:
            raise ConfigError(message)


def class_names_problem(names: Sequence[str] | None) -> str | None:
    """Why ``--classes`` cannot be used (None when it can): each must be one folder name."""
    for name in names or ():
        if not name or name in (".", "..") or any(sep in name for sep in "/\\"):
            return (f"--classes {name!r} is not a class: give the name of a class folder under the dataset root "
                    f"(no '/', '\\', '.' or '..')")
    return None


def _class_rules(s: Settings) -> str | None:
    return class_names_problem(s.run.classes)


def _method_rules(s: Settings) -> str | None:
    d = s.detector
    m, spec = d.method_name, d.spec
    if spec.combine == "single" and d.memory_bank != "single":
        return (f"--method_name {m} has a single memory bank and no decision layer fusion: use --memory_bank "
                f"single")
    if spec.combine == "add" and d.memory_bank != "single":
        return (f"--method_name {m} adds the two scores and ignores decision layer fusion: use --memory_bank "
                f"single (or DINO+Point_MAE for decision layer fusion)")
    if spec.combine == "dlf" and d.memory_bank != "multiple":
        return (f"--method_name {m} fuses its banks with the decision layer: use --memory_bank multiple (or "
                f"DINO+Point_MAE+add for a plain sum with --memory_bank single)")
    if spec.needs_uff and not s.uff.use_uff:
        return (f"--method_name {m} needs the UFF fusion block: add --use_uff and --fusion_module_path "
                f"<checkpoint> (train one with fusion_pretrain.py)")
    return None


def _option_rules(s: Settings) -> str | None:
    d, m = s.detector, s.detector.method_name
    if s.run.save_feature and m not in FEATURE_DUMP_METHODS:
        return (f"--save_feature dumps UFF pretraining features, which only {' and '.join(FEATURE_DUMP_METHODS)}"
                f" produce: use --method_name DINO+Point_MAE --memory_bank multiple --save_feature")
    if d.asy_memory_bank is not None and m != "DINO+Point_MAE+Fusion":
        return "--asy_memory_bank only applies to --method_name DINO+Point_MAE+Fusion"
    if d.asy_memory_bank is not None and d.asy_memory_bank < 1:
        return "--asy_memory_bank must be at least 1 (the xyz and fusion banks need a sample)"
    if d.rm_zero_for_project and m != "Point_MAE":
        return "--rm_zero_for_project only applies to --method_name Point_MAE"
    approximate = [f for f, v in (("--bank_search", d.bank_search != "torch"),
                                  ("--bank_rows_per_sample", d.bank_rows_per_sample is not None),
                                  ("--coreset_shard_rows", d.coreset_shard_rows is not None),
                                  ("--fusion_samples", d.fusion_samples is not None)) if v]
    if approximate and d.spec.family != "m3dm":
        return f"{approximate[0]} applies to the memory-bank methods (M3DM's and BTF's), not --method_name {m}"
    if d.coreset_shard_rows is not None and d.coreset_shards > 1:
        return "--coreset_shard_rows and --coreset_shards are two ways of sharding the coreset: give one"
    if d.fusion_samples is not None and not d.uses_dlf:
        return "--fusion_samples caps pass 2 of decision layer fusion: use it with --memory_bank multiple"
    if s.uff.use_uff and not d.spec.needs_rgb:
        return (f"--use_uff loads the UFF block, which needs RGB features: --method_name {m} has none, drop "
                f"--use_uff")
    if s.uff.use_uff and d.spec.features != "m3dm":
        return f"--use_uff feeds M3DM's ViT and Point-MAE features to the UFF block: --method_name {m} has neither"
    if s.uff.use_uff and "small" in s.backbones.rgb_backbone_name:
        return "the UFF block expects 768-d RGB features: use a ViT-B backbone with --use_uff"
    return None


# Bounds of the numeric flags (``_range_rules``); the help of --num_group and --group_size explains theirs.
MAX_NUM_GROUP = 8192  # attention over the groups: num_group² x 6 heads x 4 bytes per layer and sample
MAX_GROUPED_POINTS = 1 << 20  # num_group x group_size: 8x the reference's 1024 x 128, ~2 GiB of encoder activations
MAX_SEED = 2**32 - 1  # NumPy's seeds (the run seeds Python, NumPy and torch with the same value)


@dataclass(frozen=True)
class Bound:
    """The valid values ``low..high`` of a numeric flag (``open_low``/``open_high``: the end itself excluded)."""

    low: float
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    why: str = ""

    def holds(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high or self.high == math.inf else value <= self.high
        return bool(above and below)  # NaN fails both

    def describe(self, integer: bool) -> str:
        low, high = (f"{x:g}" if x == math.inf or not integer else str(int(x)) for x in (self.low, self.high))
        if integer:
            return f"an integer of at least {low}" if self.high == math.inf else f"an integer from {low} to {high}"
        if self.high == math.inf:
            return f"a finite value {'>' if self.open_low else '>='} {low}"
        return f"a value in {'(' if self.open_low else '['}{low}, {high}{')' if self.open_high else ']'}"


def _bounds(s: Settings) -> dict[str, Bound]:
    """Every numeric flag's bound, by flag name (some depend on other settings)."""
    b = s.backbones
    points = b.img_size * b.img_size
    bounds = {
        "num_group": Bound(1, MAX_NUM_GROUP, why="the point transformer's memory grows with num_group squared"),
        "group_size": Bound(2, min(points, MAX_GROUPED_POINTS // max(1, b.num_group)),
                            why=f"a group holds at most the {b.img_size}x{b.img_size} points of a cloud, and "
                                f"num_group x group_size is at most {MAX_GROUPED_POINTS}"),
        "f_coreset": Bound(0, 1, open_low=True, why="the fraction of the bank kept in the coreset"),
        "coreset_eps": Bound(0, 1, open_low=True, open_high=True,
                             why="the Johnson-Lindenstrauss eps of the sparse random projection"),
        "coreset_shards": Bound(1, why="1: the reference's exact selection"),
        "coreset_shard_rows": Bound(1, why="distinct bank rows per block of the coreset"),
        "fusion_samples": Bound(1, why="training samples pass 2 scores"),
        "bank_rows_per_sample": Bound(1, why="patches a training sample gives its banks; omit it to keep every "
                                            "patch"),
        "random_state": Bound(0, MAX_SEED, why="a NumPy seed"),
        "ocsvm_nu": Bound(0, 1, open_low=True, why="the one-class SVMs' outlier fraction"),
        "ocsvm_maxiter": Bound(1, why="passes of the one-class SVMs' SGD"),
        "max_sample": Bound(0, why="training samples per pass"),
        "batch_size": Bound(1, why="samples per extraction batch"),
        "num_workers": Bound(0, why="0 loads the data in the main process"),
        "seed": Bound(0, MAX_SEED, why="a NumPy seed"),
        "far": Bound(0, 1, open_high=True, why="a fraction of good parts"),
        "pixel_far": Bound(0, 1, open_high=True, why="a fraction of good parts' pixels"),
        "cfm_epochs": Bound(1, why="passes over the training pixels"),
        "cfm_batch_size": Bound(1, why="training samples per optimiser step"),
        "cfm_lr": Bound(0, open_low=True, why="Adam's learning rate"),
        "cfm_train_samples": Bound(1, why="the few-shot training set; omit it to train on every sample"),
        "cfm_seed": Bound(0, MAX_SEED, why="the seed of the mappings' initialisation and shuffling"),
        **_g2sf_bounds(),
    }
    for field_ in dataclasses.fields(ScoreWeights):
        bounds[field_.name] = Bound(0, why="a weight of one modality's score")
    return bounds


def _g2sf_bounds() -> dict[str, Bound]:
    return {
        "num_normal": Bound(0, why="augmented normal samples"),
        "num_anomalies": Bound(1, why="the LSPN learns from pseudo-anomalies"),
        "fusion_batch_size": Bound(2, why="patches per LSPN step"),
        "lr": Bound(0, open_low=True, why="Adam's learning rate"),
        "max_epoch": Bound(1, why="passes over the fusion dataset"),
        "emb_dim": Bound(1, why="a layer width"),
        "drop_out": Bound(0, 1, open_high=True, why="a dropout probability"),
        "perc": Bound(0, 1, why="a quantile"),
        "alpha": Bound(0, why="an exponent of the loss weights"),
        "anchor": Bound(0, 9, why="2 x anchor + 1 of the 20 coreset neighbours kept per patch"),
        "magnitude": Bound(0, open_low=True, why="a ratio of distances"),
        **{name: Bound(0, why="a loss weight") for name in ("margin", "const", "perm", "scaling", "l1", "l2")},
    }


def _range_rules(s: Settings) -> str | None:
    if s.backbones.img_size != 224:
        return "--img_size must be 224: the reference's RGB, mask and score-map sizes are fixed at 224"
    values = s.flags()
    for name, bound in _bounds(s).items():
        value = values[name]
        if value is not None and not bound.holds(value):
            return (f"--{name} {value} is out of range: use {bound.describe(isinstance(value, int))} "
                    f"({bound.why})")
    return None


def _model_file_rules(s: Settings) -> str | None:
    models = s.models
    if models.save_model and models.load_model is not None:
        return "--save_model fits and saves, --load_model skips fitting: use one of them"
    if models.load_model is not None and s.run.save_feature:
        return "--save_feature dumps features while fitting, which --load_model skips: drop one"
    return None


def _cfm_rules(s: Settings) -> str | None:
    d = s.detector  # the ranges of the cfm_* flags are in _bounds
    if s.uff.use_uff and d.spec.family == "cfm":
        return "--method_name CFM does not use the UFF block: drop --use_uff"
    return None


def _g2sf_rules(s: Settings) -> str | None:
    d = s.detector
    if d.spec.family != "g2sf":
        return None
    if s.uff.use_uff:
        return "--method_name G2SF does not use the UFF block: drop --use_uff"
    widths = d.n_hidden.split(",")
    if not all(w.strip().isdigit() and int(w) > 0 for w in widths):
        return f"--n_hidden {d.n_hidden!r} is not a list of widths: use positive integers separated by commas (512)"
    return None
