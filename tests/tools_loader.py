"""The repository's command-line tools (``tools/*.py``) as modules, for the tests that
call their ``main`` in the test process."""
import importlib.util
import os.path as osp

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def load_tool(name):
    """``tools/<name>.py`` loaded as the module ``colora_tools_<name>`` (each call
    loads it afresh; the tools put their folder on ``sys.path`` themselves to import
    each other)."""
    spec = importlib.util.spec_from_file_location(
        f'colora_tools_{name}', osp.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
