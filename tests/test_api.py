"""The package's public API: functions stay functions whatever is imported first."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import mars_scale


def test_public_names_are_listed_and_resolve():
    for name in mars_scale.__all__:
        assert name in dir(mars_scale)
        assert getattr(mars_scale, name) is not None


def test_ingest_and_annotate_stay_functions_after_their_modules_are_imported():
    # a fresh interpreter: whatever this test session imported first does not matter
    code = textwrap.dedent("""
        import importlib, types
        import mars_scale as ms
        import mars_scale.ingest                      # the import that used to rebind ms.ingest
        from mars_scale.annotate import result_keys   # and ms.annotate
        assert callable(ms.ingest) and not isinstance(ms.ingest, types.ModuleType), ms.ingest
        assert callable(ms.annotate) and not isinstance(ms.annotate, types.ModuleType), ms.annotate
        from mars_scale import ingest, annotate
        assert ingest is importlib.import_module("mars_scale.ingest").ingest
        assert annotate is importlib.import_module("mars_scale.annotate").annotate
        assert ms.IngestConfig is importlib.import_module("mars_scale.ingest").IngestConfig
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_config_imports_without_torch():
    """Reading a config file (the CLI's first step) loads neither torch nor numpy."""
    code = "import sys, mars_scale.config; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:] + result.stdout
