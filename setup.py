"""Install colora_mm next to the OpenMMLab 2.x stack.

torch, torchvision and mmcv (compiled with its ops) are declared with ranges but must be
installed first: pip cannot build mmcv's ops against the torch a user already has, so
``tools/setup_env.sh`` compiles it (or the user installs OpenMMLab's prebuilt mmcv wheel
for their torch/CUDA) and then installs this package with ``--no-deps``.
The ranges below are what the code supports; requirements/runtime.txt pins the exact
stack tools/setup_env.sh installs and CI tests (README.md, "Supported versions").
"""
import os.path as osp

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def read_version() -> str:
    namespace: dict = {}
    with open(osp.join(HERE, 'colora_mm', 'version.py')) as f:
        exec(f.read(), namespace)
    return namespace['__version__']


setup(
    name='colora_mm',
    version=read_version(),
    description='CoLoRA (correlated low-rank adaptation for ConvNets) for '
    'mmsegmentation and mmdetection',
    long_description=open(osp.join(HERE, 'README.md')).read()
    if osp.exists(osp.join(HERE, 'README.md')) else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['colora_mm', 'colora_mm.*']),
    # the spatial branch's CPU kernel, compiled on first use (colora_mm/adapters/up3x3.py)
    package_data={'colora_mm.adapters': ['csrc/*.cpp']},
    python_requires='>=3.9,<3.13',
    install_requires=[
        # 2.1: the newest torch with OpenMMLab's prebuilt mmcv 2.1.0 wheels
        'torch>=2.1',
        'torchvision>=0.16',
        # mmseg 1.2.2 and mmdet 3.3.0 assert mmcv < 2.2.0 at import
        'mmcv>=2.0.0,<2.2.0',
        # numpy 2: the test suite passes on 2.4 (tools/setup_offline.sh keeps a node's
        # numpy 2.x; colora_mm.compat restores what mmpretrain 1.2.0 needs from it)
        'numpy>=1.23',
        # colora_mm.compat patches mmengine 0.10.x internals
        'mmengine>=0.10.0,<0.11',
        'mmsegmentation>=1.2.0,<1.3',
        'mmdet>=3.1.0,<3.4',
        'mmpretrain>=1.1.0,<1.3',
        # mmengine imports pkg_resources (removed in setuptools 81)
        'setuptools>=64,<81',
        'ftfy',
        'regex',
    ],
    extras_require=dict(tests=['pytest>=7']),
    license='Apache-2.0',
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
    zip_safe=False,
)
