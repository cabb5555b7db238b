"""Built-in task model kinds; importing this package registers them."""

from engine.tasks.models.causal_lm import CausalLMTask
from engine.tasks.models.classification import SequenceClassificationTask
from engine.tasks.models.custom import CustomModuleTask

__all__ = ["CausalLMTask", "CustomModuleTask", "SequenceClassificationTask"]
