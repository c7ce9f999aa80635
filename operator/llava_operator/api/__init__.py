"""LlavaRun API v1alpha1: pydantic models are the single source of truth; the CRD is generated."""

from .llavarun import API_VERSION, GROUP, KIND, PLURAL, VERSION, LlavaRun, ObjectMeta
from .profiles import PROFILES, AcceleratorProfile, AcceleratorProfileName
from .spec import (
    STAGE_ORDER,
    TRAINING_STAGES,
    EvaluateStage,
    FinetuneStage,
    LlavaRunSpec,
    PrepareStage,
    PretrainStage,
    Stage,
    StageResources,
)
from .status import Condition, LlavaRunStatus, Phase, Progress, StagePhase, StageStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "PROFILES",
    "STAGE_ORDER",
    "TRAINING_STAGES",
    "VERSION",
    "AcceleratorProfile",
    "AcceleratorProfileName",
    "Condition",
    "EvaluateStage",
    "FinetuneStage",
    "LlavaRun",
    "LlavaRunSpec",
    "LlavaRunStatus",
    "ObjectMeta",
    "Phase",
    "PrepareStage",
    "PretrainStage",
    "Progress",
    "Stage",
    "StagePhase",
    "StageResources",
    "StageStatus",
]
