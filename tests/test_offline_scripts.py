"""tools/offline_bundle.sh, tools/setup_offline.sh and benchmarks/gpu_check.sh: the
checks they make before any download or install (no network needed)."""
import hashlib
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run(*argv, env=None):
    result = subprocess.run(['bash', *[str(a) for a in argv]], capture_output=True,
                            text=True, cwd=ROOT, timeout=300,
                            env=dict(os.environ, **(env or {})))
    return result.returncode, result.stdout + result.stderr


def fake_bundle(folder, python=None, corrupt=False):
    """A bundle folder with one file and its manifest (sha256 right or wrong)."""
    os.makedirs(folder, exist_ok=True)
    data = b'not really a wheel'
    with open(osp.join(folder, 'addict-2.4.0-py3-none-any.whl'), 'wb') as f:
        f.write(data + (b'!' if corrupt else b''))
    python = python or f'{sys.version_info[0]}.{sys.version_info[1]}'
    manifest = dict(python=python, platform='manylinux_2_28_x86_64', groups=['scipy'],
                    total_bytes=len(data), files=[dict(
                        name='addict', version='2.4.0',
                        file='addict-2.4.0-py3-none-any.whl', bytes=len(data),
                        sha256=hashlib.sha256(data).hexdigest())])
    with open(osp.join(folder, 'manifest.json'), 'w') as f:
        json.dump(manifest, f)
    return folder


def test_bundle_refuses_unknown_group_and_foreign_folder(tmp_path):
    code, out = run('tools/offline_bundle.sh', tmp_path / 'b', '--include', 'tensorflow')
    assert code == 1 and "unknown group 'tensorflow'" in out
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'notes.txt').write_text('mine')
    code, out = run('tools/offline_bundle.sh', tmp_path / 'busy')
    assert code == 1 and 'is not a bundle' in out
    assert (tmp_path / 'busy' / 'notes.txt').exists()       # nothing removed
    code, out = run('tools/offline_bundle.sh', tmp_path / 'b', '--python', '3')
    assert code == 1 and 'expected MAJOR.MINOR' in out


def test_install_checks_the_bundle_before_anything(tmp_path):
    env = dict(PYTHON=sys.executable, COLORA_VENV=str(tmp_path / 'venv'))
    code, out = run('tools/setup_offline.sh', tmp_path / 'nothing', env=env)
    assert code == 1 and 'not a bundle' in out
    code, out = run('tools/setup_env.sh', '--offline',
                    fake_bundle(tmp_path / 'bad', corrupt=True), env=env)
    assert code == 1 and 'differs from the manifest (sha256)' in out
    code, out = run('tools/setup_offline.sh', fake_bundle(tmp_path / 'py', python='3.4'),
                    env=env)
    assert code == 1 and 'the bundle is for Python 3.4' in out
    assert not (tmp_path / 'venv').exists()                # stopped before step 2


def test_gpu_check_needs_a_gpu_or_dry_run(tmp_path):
    code, out = run('benchmarks/gpu_check.sh', tmp_path)
    assert code == 1 and 'usage' in out
    import torch
    if torch.cuda.is_available():    # it would start installing
        return
    bundle = fake_bundle(tmp_path / 'bundle')
    code, out = run('benchmarks/gpu_check.sh', bundle, tmp_path / 'out',
                    env=dict(PYTHON=sys.executable))
    assert code == 1 and 'sees no CUDA device' in out and '--dry-run' in out
    assert not (tmp_path / 'out').exists()


def test_gpu_check_refuses_an_unknown_stage(tmp_path):
    bundle = fake_bundle(tmp_path / 'bundle')
    code, out = run('benchmarks/gpu_check.sh', bundle, tmp_path / 'out', '--dry-run',
                    env=dict(PYTHON=sys.executable, STAGES='gpu_tests bench'))
    assert code == 1 and "STAGES: unknown stage 'bench'" in out
    assert 'bench_train' in out                    # the stages it knows are named
    assert not (tmp_path / 'out').exists()         # refused before anything


def test_bundle_carries_the_mmcv_wheels_built_for_its_python(tmp_path):
    """offline_bundle.sh with a stand-in pip (no network): the cached mmcv wheels of the
    target Python go into mmcv-build/ in setup_offline.sh's layout, others stay out."""
    stub = tmp_path / 'python3'
    stub.write_text(f"""#!/usr/bin/env bash
if [ "$1" = -m ] && [ "$2" = pip ]; then
  case " $* " in *" --version "*) echo pip; exit 0 ;; esac
  prev=""; for a in "$@"; do [ "$prev" = -d ] && dir="$a"; prev="$a"; done
  case " $* " in
    *" mmcv=="*) : > "$dir/mmcv-2.1.0.tar.gz" ;;
    *) : > "$dir/addict-2.4.0-py3-none-any.whl" ;;
  esac
  exit 0
fi
exec {sys.executable} "$@"
""")
    stub.chmod(0o755)
    cache = tmp_path / 'cache' / 'mmcv-2.1.0'
    for folder, name in (('torch-2.11.0+cu130-cpu', 'cp312-cp312'),
                         ('torch-2.11.0+cu130-cuda-9.0', 'cp312-cp312'),
                         ('torch-2.14.1+cu130-cpu', 'cp311-cp311')):
        os.makedirs(cache / folder)
        (cache / folder / f'mmcv-2.1.0-{name}-linux_x86_64.whl').write_bytes(b'w')
    env = dict(PYTHON=str(stub), COLORA_CACHE=str(tmp_path / 'cache'))
    code, out = run('tools/offline_bundle.sh', tmp_path / 'b', '--python', '3.12', env=env)
    assert code == 0, out
    built = sorted(osp.relpath(osp.join(d, f), tmp_path / 'b' / 'mmcv-build')
                   for d, _, fs in os.walk(tmp_path / 'b' / 'mmcv-build') for f in fs)
    assert built == ['torch-2.11.0_cu130-cpu/mmcv-2.1.0-cp312-cp312-linux_x86_64.whl',
                     'torch-2.11.0_cu130-cuda-9.0/mmcv-2.1.0-cp312-cp312-linux_x86_64.whl']
    assert '2 mmcv wheel(s) built before' in out
    code, out = run('tools/offline_bundle.sh', tmp_path / 'b', '--python', '3.12',
                    '--no-mmcv-wheels', env=env)
    assert code == 0, out
    assert not osp.exists(tmp_path / 'b' / 'mmcv-build')
    # over the limit: the largest files named, the mmcv wheels among them, and no
    # manifest (the install and the GPU check refuse the folder)
    (cache / 'torch-2.11.0+cu130-cpu' / 'mmcv-2.1.0-cp312-cp312-linux_x86_64.whl'
     ).write_bytes(b'w' * (2 << 20))
    code, out = run('tools/offline_bundle.sh', tmp_path / 'c', '--python', '3.12',
                    '--max-mib', '1', env=env)
    assert code != 0
    assert 'over the 1 MiB limit (largest: mmcv-build/torch-2.11.0_cu130-cpu/' in out, out
    assert '--no-mmcv-wheels' in out
    assert not osp.exists(tmp_path / 'c' / 'manifest.json')


def test_setup_stops_before_torch_when_the_disk_is_full(tmp_path):
    """Too little room for torch: one error naming the venv, the space and the fix,
    before pip starts (rather than ENOSPC midway through the install)."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'df').write_text(
        '#!/bin/sh\necho "Filesystem 1024-blocks Used Available Capacity Mounted on"\n'
        'echo "/dev/vda 264000000 263500000 500000 99% /"\n')
    (bin_dir / 'df').chmod(0o755)
    venv = tmp_path / 'venv'
    code, out = run('tools/setup_env.sh', env=dict(
        PYTHON=sys.executable, COLORA_VENV=str(venv), TORCH_VERSION='0.0.1',
        PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}'))
    assert code == 1, out
    assert 'needs about 7 GiB free' in out and '488 MiB are free' in out, out
    assert str(venv) in out and 'COLORA_VENV' in out
    assert 'installing torch==' not in out                  # pip never started


def setup_step_6():
    """The Python that tools/setup_env.sh runs in its last step (its heredoc)."""
    with open(osp.join(ROOT, 'tools', 'setup_env.sh')) as f:
        text = f.read()
    step = text[text.index('step "6/6'):]
    return step[step.index("<<'PYEOF'\n") + len("<<'PYEOF'\n"):step.index('\nPYEOF')]


def test_setup_builds_the_cpu_kernels_or_says_why_not(tmp_path):
    """The set-up's last step compiles the package's CPU kernels (here found in the
    cache the suite already uses); where they cannot be built (a build folder that is a
    file) it says so, the package's warning names the reason, and the set-up goes on."""
    pytest.importorskip('mmseg')
    code = setup_step_6()
    ok = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        cwd=ROOT, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert '[setup] colora_mm CPU kernels: built (' in ok.stdout, ok.stdout
    assert '[setup] ready: colora_mm' in ok.stdout
    blocked = tmp_path / 'not_a_folder'
    blocked.write_text('')
    bad = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         cwd=ROOT, timeout=600,
                         env=dict(os.environ, COLORA_MM_EXT_DIR=str(blocked)))
    assert bad.returncode == 0, bad.stderr[-3000:]
    assert 'CPU kernels: not built, PyTorch ops run instead' in bad.stdout, bad.stdout
    assert 'could not be built' in bad.stderr and '[setup] ready: colora_mm' in bad.stdout
