"""mars-scale: MARS cell-type discovery and naming for atlases of millions of cells."""

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

__all__ = [
    "__version__",
    "MarsScaleError",
    "InputError",
    "StoreError",
    "ConfigError",
    "CheckpointMismatchError",
    "TrainingError",
]
