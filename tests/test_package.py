"""The package: version, registration on import (also via custom_imports, also twice),
and the pure-PyTorch adapters working where OpenMMLab cannot be imported."""
import ast
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / 'colora_mm'
OPENMMLAB = ('mmengine', 'mmcv', 'mmseg', 'mmdet', 'mmpretrain')


def _run_python(code):
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_version_matches_version_file_and_metadata():
    import colora_mm
    ns = {}
    exec((PACKAGE_DIR / 'version.py').read_text(), ns)
    assert colora_mm.__version__ == ns['__version__']
    from importlib.metadata import PackageNotFoundError, version
    try:
        assert version('colora_mm') == colora_mm.__version__
    except PackageNotFoundError:
        pytest.skip('colora_mm is not installed (run from a bare checkout)')


def _registered_classes():
    """(module, class name, registry variable) for every class in the package
    decorated with ``<REGISTRY>.register_module(...)``."""
    found = []
    for path in sorted(PACKAGE_DIR.rglob('*.py')):
        tree = ast.parse(path.read_text())
        module = '.'.join(path.relative_to(PACKAGE_DIR.parent).with_suffix('').parts)
        module = module[:-len('.__init__')] if module.endswith('.__init__') else module
        for node in ast.walk(tree):
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                continue
            for dec in node.decorator_list:
                call = dec.func if isinstance(dec, ast.Call) else dec
                if (isinstance(call, ast.Attribute) and call.attr == 'register_module'
                        and isinstance(call.value, ast.Name)):
                    found.append((module, node.name, call.value.id))
    return found


def test_import_registers_every_decorated_module():
    pytest.importorskip('mmengine')
    import colora_mm  # noqa: F401
    decorated = _registered_classes()
    if not decorated:
        pytest.skip('no module of the package is registered yet')
    for module_name, cls_name, registry_var in decorated:
        assert module_name in sys.modules, \
            f'{module_name} is not imported by `import colora_mm`'
        module = sys.modules[module_name]
        registry = getattr(module, registry_var)
        cls = getattr(module, cls_name)
        assert registry.get(cls_name) is cls, \
            f'{module_name}.{cls_name} is not in registry {registry.name}'


def test_import_twice_and_via_custom_imports():
    pytest.importorskip('mmengine')
    out = _run_python("""
        import importlib
        from mmengine.config import Config
        from mmengine.utils import import_modules_from_strings
        # first through a config, as mmseg/mmdet tools do
        cfg = Config(dict(custom_imports=dict(imports=['colora_mm'],
                                              allow_failed_imports=False)))
        import_modules_from_strings(**cfg.custom_imports)
        import colora_mm
        import colora_mm  # noqa: F811
        importlib.import_module('colora_mm')
        import_modules_from_strings(['colora_mm'])
        # a config file naming it, parsed after the package is imported
        import tempfile, os
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, 'cfg.py')
            open(p, 'w').write("custom_imports = dict(imports=['colora_mm'])\\n")
            Config.fromfile(p)
        print('ok', colora_mm.__version__)
    """)
    assert out.startswith('ok ')


BLOCK_OPENMMLAB = f"""
import sys
for name in {OPENMMLAB!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
"""


def test_adapters_work_without_openmmlab():
    out = _run_python(BLOCK_OPENMMLAB + """
import importlib, pkgutil
import torch, torch.nn as nn
import colora_mm
import colora_mm.adapters as adapters
for info in pkgutil.iter_modules(adapters.__path__):
    importlib.import_module(f'colora_mm.adapters.{info.name}')
loaded = [m for m in sys.modules if m.split('.')[0] in {OPENMMLAB!r} and sys.modules[m]]
assert not loaded, loaded
assert 'colora_mm.registration' not in sys.modules

torch.manual_seed(0)
base = nn.Linear(8, 6)
x = torch.randn(3, 8)
ref = base(x)
layer = adapters.AdaptedLayer(base, lambda l: adapters.LoRA(l, gamma=2), name='fc')
assert torch.allclose(layer(x), ref)           # B = 0: the base output
with torch.no_grad():
    for p in layer.adapter_branch.parameters():
        p.normal_()
adapted = layer(x)
assert not torch.allclose(adapted, ref)
layer.merge()
assert torch.allclose(layer(x), adapted, atol=1e-5)
print('ok', colora_mm.__version__)
""".replace('{OPENMMLAB!r}', repr(OPENMMLAB)))
    assert out.startswith('ok ')


def test_adapter_sources_import_nothing_from_openmmlab():
    for path in sorted((PACKAGE_DIR / 'adapters').rglob('*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or '']
            for name in names:
                assert name.split('.')[0] not in OPENMMLAB, \
                    f'{path.name} imports {name}; adapters must be pure PyTorch'
