"""benchmarks/experiments: every variant they time still equals what the package
computes (the scripts assert it before timing), and they print their tables."""
import os.path as osp
import subprocess
import sys

import pytest

pytest.importorskip('mmseg')
pytest.importorskip('mmpretrain')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run(script, *args):
    res = subprocess.run([sys.executable, osp.join(ROOT, 'benchmarks', 'experiments', script),
                          *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_spatial_variants_match_the_grouped_conv():
    out = run('spatial_variants.py', '--repeats', '1', '--no-compile')
    assert '| 3 (C=768, 8x8) | 24 |' in out and '| all | - |' in out


def test_merged_branch_variants_match_the_package():
    out = run('merged_branch.py', '--repeats', '1')
    assert 'Self time per forward pass' in out
    for name in ('as is', 'down as matmul', 'up channels-last', 'both', 'no-grad filter'):
        assert f'| {name} | ' in out
