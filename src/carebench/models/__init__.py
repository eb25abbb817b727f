"""Models: the contract (`base`), the registry, shared encoders and every registered method.

Importing this package registers all built-in methods, so `list_models()` is complete.
"""

# Registration side effects: importing the method modules fills the registry.
from carebench.models import baselines, fusion  # noqa: F401  (after the registry exists)
from carebench.models.base import (
    TASKS,
    BaseModel,
    ModelConfigError,
    ModelOutput,
    TaskSpec,
    num_outputs,
    task_spec,
)
from carebench.models.registry import create_model, get_model_class, list_models, register

__all__ = [
    "TASKS",
    "BaseModel",
    "ModelConfigError",
    "ModelOutput",
    "TaskSpec",
    "create_model",
    "get_model_class",
    "list_models",
    "num_outputs",
    "register",
    "task_spec",
]
