"""Logging from the Python API: visible by default, silent once the application configures logging."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_info_lines_reach_stderr_without_any_logging_setup():
    r = _run("import logging, mars_scale\n"
             "logging.getLogger('mars_scale.train').info('pretrain epoch 1/25')\n"
             "logging.getLogger('mars_scale.train').debug('not shown')\n")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if "mars_scale.train" in l]
    assert len(lines) == 1 and lines[0].endswith("INFO mars_scale.train: pretrain epoch 1/25")


def test_the_applications_own_logging_gets_each_record_once():
    r = _run("import logging, sys, mars_scale\n"
             "logging.basicConfig(stream=sys.stderr, format='APP %(name)s %(message)s', level=logging.INFO)\n"
             "logging.getLogger('mars_scale.train').info('pretrain epoch 1/25')\n")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if "pretrain epoch" in l]
    assert lines == ["APP mars_scale.train pretrain epoch 1/25"]


def test_the_library_can_be_quieted():
    r = _run("import logging, mars_scale\n"
             "logging.getLogger('mars_scale').setLevel(logging.WARNING)\n"
             "logging.getLogger('mars_scale.train').info('hidden')\n"
             "logging.getLogger('mars_scale.train').warning('shown')\n")
    assert "hidden" not in r.stderr and "WARNING mars_scale.train: shown" in r.stderr
