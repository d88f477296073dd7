"""diffstage: declarative diffusion pipelines from one YAML file per model."""
from .builder import build_from_config, build_pipeline, check_model
from .callbacks import reads
from .errors import (ConcurrentUseError, DiffstageError, DisallowedPathError, LoadError, OutputError, Problem,
                     RequestError, SpecError, StageError, UnsafeCheckpointError)
from .pipeline import Pipeline, PipelineOutput
from .pipeline_builder import PipelineBuilder
from .quantize import silence_import_noise
from .req import FieldSpec, Req
from .session import Session, default_session
from .stage import CallbackSpec, Contract, PipelineStage
from .stage_catalog import use_standard_stages
from .stages import STANDARD_STAGES

# The entry point hands the standard stages to the framework, which never imports them (stage_catalog.py).
use_standard_stages(STANDARD_STAGES)
silence_import_noise()  # torchao's import lines (Diffusers imports it when the quant extra is installed)

__version__ = "0.1.0"

__all__ = [
    "build_pipeline", "build_from_config", "check_model", "PipelineBuilder", "Pipeline", "PipelineOutput", "Req", "FieldSpec", "reads",
    "PipelineStage", "CallbackSpec", "Contract", "DiffstageError", "SpecError", "Problem",
    "DisallowedPathError", "LoadError", "RequestError", "UnsafeCheckpointError", "StageError", "OutputError",
    "ConcurrentUseError", "Session", "default_session",
]
