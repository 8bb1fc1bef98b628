"""Model builders for teachers and students, chosen by `kind` in a recipe."""

from distill.students.builders import ModelConfig, build_model, model_config_adapter
from distill.students.cnn import CNN, CNNConfig
from distill.students.mlp import MLP, MLPConfig

__all__ = ["CNN", "CNNConfig", "MLP", "MLPConfig", "ModelConfig", "build_model", "model_config_adapter"]
