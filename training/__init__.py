"""Training and evaluation of HAT models (the library is :mod:`model`; it never imports this package).

* :func:`train` with :class:`TrainConfig`; :func:`build_model` (a fresh model with its pretrained parts);
  :data:`PRESETS` (``demo``, ``paper``: model config + recipe).
* :mod:`training.evaluate`: R@K / RSUM for i2t and t2i (``python -m training.evaluate``).
* :mod:`training.synthetic`: the generated image-caption world (``python -m training.synthetic``).
* ``python -m training.train``: the command line over :func:`train`.
"""

from importlib import import_module

# Names are imported on first use, so that ``python -m training.evaluate`` (or ``.synthetic``) does not load
# the module it runs through the package first (runpy warns about that, and it is slower).
_HOMES = {
    "NEVER": "config",
    "TrainConfig": "config",
    "train": "loop",
    "DEMO_TEXT_PACKAGE": "presets",
    "PRESETS": "presets",
    "demo_model_config": "presets",
    "paper_model_config": "presets",
    "build_model": "weights",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)
