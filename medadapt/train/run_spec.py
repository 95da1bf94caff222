"""What a fine-tune needs to be applied again: ``<run>/job.json``, and the model it rebuilds.

The 3D job (:mod:`medadapt.train.finetune3d`) and the 2D one (depth 1) write a :class:`RunSpec` beside each
run's ``adapter/``:
SAM's geometry and input size, the slab depth, the prompt kind, the classes, the volume preprocessing
(intensity scaling, spacing) and the slab orientation, and a fingerprint of the frozen backbone's weights.
:func:`load_run` rebuilds SAM (the same random initialisation from the seed, or the checkpoint), checks
that fingerprint (another checkpoint, or a random backbone rebuilt differently by another torch version,
would silently give other features under the trained adapters) and loads the adapter.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .._atomic import atomic_write_text
from .._fingerprint import weights_fingerprint
from ..core.io import load_adapter
from ..data.volumes import volume_preprocessing_options
from .sam_factory import SAM_GEOMETRIES, build_sam

__all__ = ["JOB_FILE", "RUN_SPEC_VERSION", "RunSpec", "backbone_fingerprint", "load_run", "read_run_spec"]

JOB_FILE = "job.json"
RUN_SPEC_VERSION = 1


@dataclass
class RunSpec:
    """How a run's model was built and fed (see the module docstring).

    ``volume_options`` are all keyword arguments of :func:`~medadapt.data.build_volume_preprocessing` (the
    chosen ones and the defaults of the time, :func:`~medadapt.data.volumes.volume_preprocessing_options`);
    slabs are ``depth`` slices along ``axis`` of the preprocessed ``(X, Y, Z)`` volume, turned in-plane by
    ``quarter_turns`` × 90°.
    """

    arch: str
    img_size: int
    depth: int
    prompt: str
    classes: list[int]
    class_names: list[str]
    seed: int
    checkpoint: str | None = None
    backbone_fingerprint: str = ""
    volume_options: dict = field(default_factory=dict)
    axis: int = 2
    quarter_turns: int = 1
    adapter_dir: str = "adapter"
    job: str = "finetune3d"
    format_version: int = RUN_SPEC_VERSION

    def __post_init__(self) -> None:
        if self.arch not in SAM_GEOMETRIES:
            raise ValueError(f"arch must be one of {sorted(SAM_GEOMETRIES)}, got {self.arch!r}")
        if self.prompt not in ("box", "point"):
            raise ValueError(f"prompt must be 'box' or 'point', got {self.prompt!r}")
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"depth must be an integer >= 1, got {self.depth!r}")
        if not self.classes or len(self.classes) != len(self.class_names):
            raise ValueError(f"classes {self.classes} and class_names {self.class_names} must be non-empty and "
                             "of the same length")
        if self.axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {self.axis!r}")
        if not isinstance(self.quarter_turns, int) or isinstance(self.quarter_turns, bool):
            raise ValueError(f"quarter_turns must be an integer, got {self.quarter_turns!r}")
        if self.checkpoint is not None:  # segmenting from another folder must still find it
            self.checkpoint = os.path.abspath(self.checkpoint)
        if not isinstance(self.volume_options, dict):
            raise ValueError(f"volume_options must be a dict, got {self.volume_options!r}")
        self.volume_options = volume_preprocessing_options(**self.volume_options)  # checked, defaults filled in

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write ``<run_dir>/job.json`` (atomically); returns its path."""
        path = Path(run_dir) / JOB_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        record = asdict(self)
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
        return path


def read_run_spec(run_dir: str | os.PathLike) -> RunSpec:
    """The :class:`RunSpec` in ``<run_dir>/job.json``.

    Raises:
        ValueError naming the file: missing (not a fine-tune's folder), not JSON, unknown fields,
        a newer ``format_version``.
    """
    path = Path(run_dir) / JOB_FILE
    if not path.is_file():
        raise ValueError(f"run folder {str(run_dir)!r} has no {JOB_FILE}: expected the output folder of "
                         "`medadapt demo` / `medadapt finetune [--3d]` (or its decoder_only/ subfolder)")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not a readable JSON file: {err}") from err
    if not isinstance(record, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(record).__name__}")
    known = {f.name for f in fields(RunSpec)}
    unknown = sorted(set(record) - known)
    if unknown:
        raise ValueError(f"{str(path)!r} has unknown fields {unknown} (written by a newer medadapt?)")
    version = record.get("format_version", 1)
    if not isinstance(version, int):
        raise ValueError(f"{str(path)!r}: format_version must be an integer, got {version!r}")
    if version > RUN_SPEC_VERSION:
        raise ValueError(f"{str(path)!r} has format_version {record['format_version']}; this medadapt reads "
                         f"up to {RUN_SPEC_VERSION}: upgrade medadapt")
    options = record.get("volume_options", {})
    if not isinstance(options, dict):
        raise ValueError(f"{str(path)!r}: volume_options must be a JSON object, got {options!r}")
    record["volume_options"] = dict(options)
    try:
        return RunSpec(**record)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{str(path)!r}: {err}") from err


def backbone_fingerprint(sam: nn.Module) -> str:
    """:func:`~medadapt._fingerprint.weights_fingerprint` of the whole ``state_dict`` of SAM as built, before
    any adapter is injected (after injection the wrapped names differ)."""
    return weights_fingerprint(sam)


def load_run(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
             device: torch.device | str = "cpu") -> tuple[nn.Module, RunSpec]:
    """Rebuild a run's SAM with its trained adapter, in eval mode on ``device``.

    Args:
        run_dir: a fine-tune's output folder (``job.json`` + ``adapter/``; 2D or 3D job).
        checkpoint: the SAM weights when the run used a checkpoint that now lives elsewhere (default: the
            path in ``job.json``); must be the same weights.

    Raises:
        ValueError: no ``job.json``; a checkpoint file that does not exist; weights whose fingerprint
            differs from the run's (another checkpoint, or a random backbone this torch does not rebuild
            identically); an adapter that does not fit.
    """
    spec = read_run_spec(run_dir)
    checkpoint = checkpoint if checkpoint is not None else spec.checkpoint
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ValueError(f"checkpoint {str(checkpoint)!r} of run {str(run_dir)!r} does not exist: pass "
                         "--checkpoint PATH with the same SAM weights")
    sam = build_sam(spec.arch, spec.img_size, checkpoint, seed=spec.seed)
    found = backbone_fingerprint(sam)
    if spec.backbone_fingerprint and found != spec.backbone_fingerprint:
        what = (f"checkpoint {str(checkpoint)!r}" if checkpoint is not None
                else f"the random backbone rebuilt from seed {spec.seed} (torch {torch.__version__})")
        raise ValueError(f"{what} does not have the weights run {str(run_dir)!r} was trained on (backbone "
                         f"fingerprint {found[:12]} vs {spec.backbone_fingerprint[:12]}): its adapter would run "
                         "on other features")
    load_adapter(sam, Path(run_dir) / spec.adapter_dir)
    return sam.to(device).eval(), spec
