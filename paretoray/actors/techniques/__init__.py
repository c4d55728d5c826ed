"""Techniques, one module each; importing this package registers every one of them.

Adding a technique means adding a module here (and its test): nothing else is edited.
"""

import importlib
import pkgutil

from paretoray.actors.techniques.base import (
    Param,
    Technique,
    UnknownTechniqueError,
    available_techniques,
    build_technique,
    parse_technique,
    reference_technique,
    register,
    technique_class,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Param",
    "Technique",
    "UnknownTechniqueError",
    "available_techniques",
    "build_technique",
    "parse_technique",
    "reference_technique",
    "register",
    "technique_class",
]
