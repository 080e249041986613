"""The adapter package imports nothing from OpenMMLab (checked on the source, by ast)."""
import ast
from pathlib import Path

ADAPTERS_DIR = Path(__file__).resolve().parents[2] / 'colora_mm' / 'adapters'
OPENMMLAB = {'mmengine', 'mmcv', 'mmseg', 'mmdet', 'mmpretrain', 'mmcls', 'mmdet3d',
             'mmaction', 'mmpose', 'mmocr', 'mmrotate', 'mmyolo', 'mmagic', 'mmedit'}


def _imports(path):
    """(top-level module, level) for every import statement, wherever it appears
    (module level, functions, try blocks)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.extend((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or '', node.level))
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
              and getattr(node.func, 'id', getattr(node.func, 'attr', '')) in
              ('import_module', '__import__') and node.args
              and isinstance(node.args[0], ast.Constant)):
            out.append((str(node.args[0].value), 0))
    return out


def test_adapter_sources_exist():
    names = {p.name for p in ADAPTERS_DIR.glob('*.py')}
    assert {'base.py', 'colora_pair.py', 'filter.py', 'spatial.py', 'lora.py', 'hira.py',
            'conv_adapter.py', 'inject.py'} <= names


def test_no_openmmlab_import_in_adapter_sources():
    for path in sorted(ADAPTERS_DIR.rglob('*.py')):
        for module, level in _imports(path):
            top = module.split('.')[0]
            if level == 0:
                assert top not in OPENMMLAB, f'{path.name} imports {module}'
                if top == 'colora_mm':       # absolute import of the package itself
                    assert module.startswith('colora_mm.adapters'), \
                        f'{path.name} imports {module} (outside the adapter package)'
            else:
                # relative imports stay inside colora_mm/adapters (level 1)
                assert level == 1, f'{path.name}: from {"." * level}{module} leaves ' \
                    'the adapter package'


def test_checker_sees_imports(tmp_path):
    """Sensitivity: the parser above finds imports in every form it checks."""
    src = ('import mmengine\nfrom mmcv.cnn import ConvModule\n'
           'def f():\n    from ..registration import x\n'
           'importlib.import_module("mmseg.models")\n')
    probe = tmp_path / 'probe.py'
    probe.write_text(src)
    found = _imports(probe)
    assert ('mmengine', 0) in found and ('mmcv.cnn', 0) in found
    assert ('registration', 2) in found and ('mmseg.models', 0) in found
