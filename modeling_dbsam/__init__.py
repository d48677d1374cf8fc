"""DB-SAM for Hugging Face transformers.

Importing the package registers the ``dbsam`` model type with ``AutoConfig``, ``AutoModel`` and
``AutoModelForMaskGeneration``, and the ``promptable-mask-generation`` pipeline, so saved DB-SAM
folders load with the Auto classes and ``pipeline`` without ``trust_remote_code``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskGeneration

from .configuration_dbsam import DBSamConfig
from .modeling_dbsam import DBSamModel, DBSamVisionEncoder
from .pipelines import PromptableMaskGenerationPipeline, register_pipelines

__version__ = "0.1.0"

AutoConfig.register("dbsam", DBSamConfig, exist_ok=True)
AutoModel.register(DBSamConfig, DBSamModel, exist_ok=True)
AutoModelForMaskGeneration.register(DBSamConfig, DBSamModel, exist_ok=True)
register_pipelines()  # pipeline("promptable-mask-generation", model=...)

__all__ = ["DBSamConfig", "DBSamModel", "DBSamVisionEncoder", "PromptableMaskGenerationPipeline"]
