"""Build a model from its recipe config; the config is stored with the weights so `distill eval` can rebuild it."""

from typing import Annotated, Union

from pydantic import Field, TypeAdapter
from torch import nn

from distill.students.cnn import CNN, CNNConfig
from distill.students.mlp import MLP, MLPConfig

ModelConfig = Annotated[Union[MLPConfig, CNNConfig], Field(discriminator="kind")]
model_config_adapter = TypeAdapter(ModelConfig)
_BUILDERS = {"mlp": MLP, "cnn": CNN}


def build_model(config: MLPConfig | CNNConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return _BUILDERS[config.kind](config, tuple(input_shape), num_classes)
