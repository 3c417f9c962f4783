"""mars-scale: MARS cell-type discovery and naming for atlases of millions of cells.

The public API is small; submodules are loaded on first use so that ``import mars_scale`` and
the command line start quickly.
"""

import importlib
import logging
import sys
import types
import warnings
from importlib.metadata import PackageNotFoundError, version

from mars_scale.errors import (
    CheckpointMismatchError,
    ConfigError,
    InputError,
    MarsScaleError,
    StoreError,
    TrainingError,
)

class _DefaultLogHandler(logging.StreamHandler):
    """INFO lines of the library on stderr while the application has configured no logging.

    Installed at import only when logging is not configured yet (the root logger has no
    handler), as in a plain Python session or a notebook, which then sees what the CLI shows
    (sizes, epochs, timings). Once the root logger gets a handler (``logging.basicConfig``) this
    handler stays silent and records propagate there as usual; ``mars-scale`` installs its own.
    Where logging is configured before the import (an application, pytest) nothing is changed.
    ``logging.getLogger("mars_scale").setLevel(logging.WARNING)`` quiets the library.
    """

    def __init__(self) -> None:
        super().__init__()  # sys.stderr at the time of each record
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            self.stream = sys.stderr
            super().emit(record)


_logger = logging.getLogger("mars_scale")
if not _logger.handlers and not logging.getLogger().handlers:
    _logger.addHandler(_DefaultLogHandler())
    if _logger.level == logging.NOTSET:
        _logger.setLevel(logging.INFO)

# zarr 3.1 warns on every small array written without shards; our large arrays set them.
warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)

try:
    __version__ = version("mars-scale")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

_LAZY = {
    "open_store": "mars_scale.store",
    "ingest": "mars_scale.ingest",
    "IngestConfig": "mars_scale.ingest",
    "compute_stats": "mars_scale.stats",
    "Loader": "mars_scale.loader",
    "Mars": "mars_scale.model",
    "RunConfig": "mars_scale.config",
    "TrainConfig": "mars_scale.config",
    "ModelConfig": "mars_scale.config",
    "load_config": "mars_scale.config",
    "annotate": "mars_scale.annotate",
    "leave_one_out": "mars_scale.evaluate",
}

__all__ = [
    "__version__",
    *_LAZY,
    "MarsScaleError",
    "InputError",
    "StoreError",
    "ConfigError",
    "CheckpointMismatchError",
    "TrainingError",
]


# Functions named like the submodule that defines them. Python binds a submodule on its
# package when it is imported, which would replace ``mars_scale.ingest`` (the function) by the
# module after the first import; the package's class below refuses that binding (the module
# stays reachable as ``sys.modules["mars_scale.ingest"]`` and through ``from ... import``).
_NAMED_LIKE_THEIR_MODULE = frozenset(n for n, module in _LAZY.items() if module == f"mars_scale.{n}")


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _NAMED_LIKE_THEIR_MODULE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'mars_scale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
