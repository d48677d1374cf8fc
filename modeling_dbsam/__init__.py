"""DB-SAM for Hugging Face transformers.

Importing the package registers the ``dbsam`` model type with ``AutoConfig``, ``AutoModel`` and
``AutoModelForMaskGeneration``, and the ``promptable-mask-generation`` pipeline, so saved DB-SAM
folders load with the Auto classes and ``pipeline`` without ``trust_remote_code``.

The import itself is light (no torch, transformers or SimpleITK), so that ``dbsam --help`` answers at
once: the public classes load on first use (module ``__getattr__``), and registration runs as soon
as transformers' Auto classes or pipelines are imported (at once if they already are), through a
post-import hook on those modules. Importing the Auto classes pulls in torch anyway, so registering
then costs nothing extra.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

__version__ = "0.1.0"

_LAZY = {
    "DBSamConfig": "modeling_dbsam.configuration_dbsam",
    "DBSamModel": "modeling_dbsam.modeling_dbsam",
    "DBSamVisionEncoder": "modeling_dbsam.modeling_dbsam",
    "PromptableMaskGenerationPipeline": "modeling_dbsam.pipelines",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        register()  # whoever uses a class may load a saved folder next
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


def _register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    from modeling_dbsam.configuration_dbsam import DBSamConfig

    AutoConfig.register("dbsam", DBSamConfig, exist_ok=True)


def _register_models() -> None:
    from transformers.models.auto.modeling_auto import AutoModel, AutoModelForMaskGeneration

    from modeling_dbsam.configuration_dbsam import DBSamConfig
    from modeling_dbsam.modeling_dbsam import DBSamModel

    _register_config()
    AutoModel.register(DBSamConfig, DBSamModel, exist_ok=True)
    AutoModelForMaskGeneration.register(DBSamConfig, DBSamModel, exist_ok=True)


def _register_pipelines() -> None:
    from modeling_dbsam.pipelines import register_pipelines

    register_pipelines()  # pipeline("promptable-mask-generation", model=...)


_HOOKS = {
    "transformers.models.auto.configuration_auto": _register_config,
    "transformers.models.auto.modeling_auto": _register_models,
    "transformers.pipelines": _register_pipelines,
}
"""Registration to run once each module has been imported (by anyone)."""

_WATCHED = ("transformers", "modeling_dbsam.")
_pending: list = []
_running = False


def register() -> None:
    """Register everything now (the model classes, the Auto mappings, the pipeline); safe to call more than once."""
    _register_models()
    _register_pipelines()


def _watched(name: str) -> bool:
    return name == "transformers" or name.startswith(("transformers.", "modeling_dbsam."))


def _importing(other_than: str) -> bool:
    """Whether a transformers or modeling_dbsam module other than ``other_than`` is still being executed."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name != other_than and _watched(name)
    )


def _run_pending(finished: str) -> None:
    """Run the queued registrations once no watched import is half done (registering imports more of transformers)."""
    global _running
    if _running or _importing(finished):
        return
    _running = True
    try:
        while _pending:
            _pending.pop(0)()
    finally:
        _running = False


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loaders of transformers' and our modules, so that the registrations queued in ``_HOOKS`` run
    right after the outermost import that brought their module in has finished."""

    def find_spec(self, fullname, path, target=None):
        if not _watched(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookedLoader(spec.loader)
                return spec
        return None


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_source, get_filename, is_package... of the real loader
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if module.__name__ in _HOOKS:
            _pending.append(_HOOKS[module.__name__])
        if _pending:
            _run_pending(module.__name__)


def _install_hooks() -> None:
    if not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
    _pending.extend(hook for name, hook in _HOOKS.items() if name in sys.modules)  # already imported: now
    _run_pending(__name__)


_install_hooks()
