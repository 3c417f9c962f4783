"""Shared helpers of the benchmark scripts: environment record, results, peak memory.

Every benchmark writes ``benchmarks/results/<name>.json`` through :func:`write_result`, which
adds the machine (CPU model, cores, RAM, load average), the software versions, the git commit
and the date. A measurement whose own peak memory matters runs in a fresh interpreter through
:func:`run_measurement`: the script calls itself with ``--measure NAME --params JSON``,
:func:`measurement_main` runs the registered function there and prints one JSON line, which
carries the child's peak RSS, wall time and CPU time.

Usage in a script::

    from _common import measurement_main, run_measurement, write_result

    def read_all(params): ...          # returns a dict of numbers

    MEASUREMENTS = {"read_all": read_all}

    if __name__ == "__main__":
        if measurement_main(MEASUREMENTS):   # this process is a child: done
            raise SystemExit(0)
        result = run_measurement(__file__, "read_all", {"store": "..."})
        write_result("example", {"read_all": result})
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = [
    "RESULTS",
    "environment",
    "git_commit",
    "load_average",
    "measurement_main",
    "peak_rss_mb",
    "run_measurement",
    "write_result",
]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
_MARK = "@@measurement@@ "
_PACKAGES = ("numpy", "scipy", "torch", "zarr", "numcodecs", "dask", "anndata", "h5py", "faiss", "mars_scale")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def cpu_seconds() -> float:
    """User plus system CPU time of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (other work on a shared machine skews timings)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not available
        return []


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_DISTRIBUTIONS = {"faiss": ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu"), "mars_scale": ("mars-scale",)}


def _version(name: str) -> str | None:
    from importlib import metadata

    for dist in _DISTRIBUTIONS.get(name, (name,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        module = importlib.import_module(name)
    except Exception:  # not installed, or broken: record its absence
        return None
    return str(getattr(module, "__version__", "unknown"))


def git_commit() -> dict[str, Any]:
    """Commit of the working tree and whether it has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


# Taken when the benchmark starts: a long run outlives commits made meanwhile, and the code that
# ran is the tree at its start (or the package snapshot it imports, named by "package_path").
_GIT_AT_START = git_commit()


def environment() -> dict[str, Any]:
    """Hardware, software versions, git commit at the start, date and load of this machine."""
    import psutil

    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # torch missing or broken: no GPU to report
        pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": {
            "cpu_model": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False),
            "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "gpu": gpu,
        },
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in _PACKAGES},
        "git": _GIT_AT_START,
        "package_path": str(Path(sys.modules["mars_scale"].__file__).parent) if "mars_scale" in sys.modules else None,
        "load_average": load_average(),
    }


def write_result(name: str, payload: Mapping[str, Any], *, key: str | None = None) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the environment added.

    Parameters
    ----------
    name
        File stem.
    payload
        JSON-serialisable results (parameters and measurements).
    key
        If given, the payload (with its environment) goes under ``runs[key]`` of the file and
        other keys already there are kept, so runs of one benchmark on different inputs can
        share a file. Otherwise the file is replaced.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"environment": environment(), **payload}
    if key is None:
        data: dict[str, Any] = record
    else:
        data = {}
        if path.exists():
            with open(path) as fh:
                data = json.load(fh)
        data.setdefault("runs", {})[key] = record
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=_jsonable)
        fh.write("\n")
    os.replace(tmp, path)
    logger.info("wrote %s", path)
    return path


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def run_measurement(
    script: str | os.PathLike,
    name: str,
    params: Mapping[str, Any],
    *,
    timeout: float = 1800,
    python: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its result.

    The child is ``python SCRIPT --measure NAME --params JSON``; see :func:`measurement_main`.
    ``python`` is the child's interpreter (default: this one), e.g. another virtual
    environment's for a peer package that needs another Python.

    Returns
    -------
    dict
        The measurement's own numbers plus ``peak_rss_mb`` (the child's peak),
        ``baseline_rss_mb`` (its RSS after imports, before the work), ``wall_s``,
        ``cpu_s`` (user + system, all threads) and ``load_average`` at the end.

    Raises
    ------
    RuntimeError
        If the child fails or prints no result.
    """
    cmd = [str(python or sys.executable), str(script), "--measure", name, "--params", json.dumps(dict(params), default=_jsonable)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"measurement {name} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    result = json.loads(lines[-1][len(_MARK):])
    logger.info("%s done in %.1f s", name, time.perf_counter() - started)
    return result


def measurement_main(measurements: Mapping[str, Callable[[dict], dict]]) -> bool:
    """Run a measurement if this process was started by :func:`run_measurement`.

    Parameters
    ----------
    measurements
        Registered functions by name; each takes the parameter dict and returns a dict.

    Returns
    -------
    bool
        True if this process was a measurement child (the caller should then exit).
    """
    if "--measure" not in sys.argv:
        return False
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", required=True, choices=sorted(measurements))
    parser.add_argument("--params", default="{}")
    args, _ = parser.parse_known_args()
    params = json.loads(args.params)
    baseline = current_rss_mb()
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    result = dict(measurements[args.measure](params))
    result.setdefault("wall_s", round(time.perf_counter() - wall0, 3))
    result.setdefault("cpu_s", round(cpu_seconds() - cpu0, 3))
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["baseline_rss_mb"] = round(baseline, 1)
    result["load_average"] = load_average()
    sys.stdout.write(_MARK + json.dumps(result, default=_jsonable) + "\n")
    sys.stdout.flush()
    return True


def writes_as_spec_0_1_0():
    """A context manager under which mars-scale writes stores as spec 0.1.0 did: blosc chunks
    without checksums, no metadata checksums and int32 column indices (for the checksum-cost
    benchmark and the tests of older stores)."""
    import contextlib

    import mars_scale.store as store_module

    def old_codecs(fmt, *, compression_level=3, strings=False):
        if strings:
            return {}
        if fmt == 3:
            from zarr.codecs import BloscCodec

            return {"compressors": [BloscCodec(cname="lz4", clevel=compression_level, shuffle="shuffle")]}
        from numcodecs import Blosc

        return {"compressors": Blosc(cname="lz4", clevel=compression_level, shuffle=Blosc.SHUFFLE)}

    stack = contextlib.ExitStack()
    for module, name, value in ((store_module, "chunk_codecs", old_codecs), (store_module, "seal", lambda path: None),
                                (store_module, "SPEC_VERSION", "0.1.0"), (store_module, "UINT16_GENES", 0)):
        old = getattr(module, name)
        setattr(module, name, value)
        stack.callback(setattr, module, name, old)
    return stack
