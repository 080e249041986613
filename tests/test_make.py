"""The README's test command: `make test` hands pytest its xdist workers (one per usable
CPU, at most 4), runs the suite in one process when asked to or when pytest-xdist is
missing, and passes PYTEST_ARGS on."""
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest

from cpus import usable_cpus

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

pytestmark = pytest.mark.skipif(shutil.which('make') is None, reason='needs make')


def pytest_line(*overrides):
    """The pytest command `make test` would run (`make -n`: printed, not run)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('OMP_NUM_THREADS', 'OMP_THREAD_LIMIT', 'PYTEST_WORKERS',
                        'PYTEST_ARGS', 'MAKEFLAGS', 'MFLAGS', 'MAKELEVEL')}
    res = subprocess.run(['make', '-n', '-C', ROOT, 'test', *overrides], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ' -m pytest tests' in ln]
    assert len(lines) == 1, res.stdout
    return lines[0].split(' -m pytest tests', 1)[1].split()


def test_workers_follow_the_usable_cpus_at_most_four():
    pytest.importorskip('xdist')
    n = min(4, usable_cpus())
    args = pytest_line(f'PY={sys.executable}')
    assert args == (['-n', str(n), '--dist', 'loadfile'] if n > 1 else [])


def test_one_worker_and_pytest_args():
    pytest.importorskip('xdist')
    assert pytest_line(f'PY={sys.executable}', 'PYTEST_WORKERS=3',
                       'PYTEST_ARGS=-x -k pair') == ['-n', '3', '--dist', 'loadfile',
                                                     '-x', '-k', 'pair']
    assert pytest_line(f'PY={sys.executable}', 'PYTEST_WORKERS=1') == []


def test_one_process_where_pytest_xdist_is_missing(tmp_path):
    python = tmp_path / 'python'          # an interpreter that cannot import xdist
    python.write_text('#!/bin/sh\nexit 1\n')
    python.chmod(0o755)
    assert pytest_line(f'PY={python}', 'PYTEST_WORKERS=3') == []
