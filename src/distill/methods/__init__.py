"""Registered distillation methods. Importing this package registers every method."""

from typing import Annotated, Union

from pydantic import Field, TypeAdapter

from distill.methods import kd, supervised  # noqa: F401  (registration side effect)
from distill.methods.base import REGISTRY, Method, MethodConfig, register

DISTILL_METHODS = {name: cls for name, cls in REGISTRY.items() if cls.needs_teacher}
_configs = tuple(cls.Config for cls in DISTILL_METHODS.values())
# A discriminated union picks the config by its `method` tag, so errors name the right fields.
MethodConfigUnion = Annotated[Union[_configs], Field(discriminator="method")] if len(_configs) > 1 else _configs[0]
method_config_adapter = TypeAdapter(MethodConfigUnion)


def build_method(config: MethodConfig, teacher=None) -> Method:
    return REGISTRY[config.method](config, teacher)


__all__ = ["DISTILL_METHODS", "REGISTRY", "Method", "MethodConfig", "MethodConfigUnion", "build_method", "register"]
