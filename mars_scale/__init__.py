"""mars-scale: MARS cell-type discovery and naming for atlases of millions of cells.

The public API is small; submodules are loaded on first use so that ``import mars_scale`` and
the command line start quickly.
"""

import importlib
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
    "ModelConfig": "mars_scale.nn",
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


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mars_scale' has no attribute {name!r}")
