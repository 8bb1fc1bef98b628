"""Registered distillation methods. Every module of this package is imported, which registers its method."""

import importlib
import pkgutil
from typing import Annotated, Union

from pydantic import Field, TypeAdapter

from distill.methods.base import REGISTRY, Method, MethodConfig, register

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

DISTILL_METHODS = {name: cls for name, cls in sorted(REGISTRY.items()) if cls.needs_teacher}
_configs = tuple(cls.Config for cls in DISTILL_METHODS.values())
# A discriminated union picks the config by its `method` tag, so errors name the right fields.
MethodConfigUnion = Annotated[Union[_configs], Field(discriminator="method")] if len(_configs) > 1 else _configs[0]
method_config_adapter = TypeAdapter(MethodConfigUnion)


def build_method(config: MethodConfig, teacher=None) -> Method:
    return REGISTRY[config.method](config, teacher)


__all__ = ["DISTILL_METHODS", "REGISTRY", "Method", "MethodConfig", "MethodConfigUnion", "build_method", "register"]
