"""torch.hub entry points: one per TwistNet of the registry in models.py, named as there.

Usage:
    import torch
    model = torch.hub.load("path/to/TwistNet-2D", "twistnet18", source="local", num_classes=47)
    model = torch.hub.load("path/to/TwistNet-2D", "twistnet18", source="local", num_classes=47,
                           pretrained=True)              # weights/ as train.py --pretrained finds them

Every entry point is models.build_model(name, num_classes, pretrained=..., **kwargs): pretrained=True
looks for weights/<name>_imagenet.pt only (under the current directory, then beside models.py; see
models.build_model for the fallbacks), never for SparK weights, which are used only when named by path;
a path loads that checkpoint; the other
keywords are TwistNet's (r, heads, stages, ...: models.twistnet_hyperparameters()).
"""
from typing import Any as _Any, Callable as _Callable

import torch.nn as _nn

import models as _models

dependencies = ["torch", "timm"]

# torch.hub puts this folder first on sys.path, but a `models` imported earlier (a package of the
# calling project is often called so) would be reused: refuse it rather than fail obscurely later.
if not hasattr(_models, "twistnet_variants"):
    raise ImportError(f"hubconf.py needs TwistNet-2D's models.py, but 'models' is already imported from "
                      f"{getattr(_models, '__file__', '?')}: load TwistNet in a process that has not "
                      f"imported another 'models'")


def _entry_point(name: str) -> _Callable[..., _nn.Module]:
    def load(pretrained: bool | str = False, num_classes: int = 1000, **kwargs: _Any) -> _nn.Module:
        return _models.build_model(name, num_classes, pretrained=pretrained, **kwargs)
    spec = _models.get_spec(name)
    load.__name__ = load.__qualname__ = name
    load.__doc__ = (f"{spec.display}: {spec.description}.\n\n    pretrained: False, True (weights/ lookup, as "
                    f"train.py) or a checkpoint path; num_classes; TwistNet keywords "
                    f"({', '.join(_models.twistnet_hyperparameters())}).")
    return load


globals().update({_name: _entry_point(_name) for _name in _models.twistnet_variants()})
