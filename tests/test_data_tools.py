"""tools/data: check_data.py names every problem of a dataset on one line each (also
unreadable files), and the prepare scripts resume an interrupted unpack."""
import importlib.util
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest

from data_gen import make_ade20k, make_coco

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(ROOT, 'tools', 'data')


def load_check():
    spec = importlib.util.spec_from_file_location(
        'colora_check_data_tools', osp.join(TOOLS, 'check_data.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = load_check()


def test_unreadable_label_maps_and_annotations_are_problems(tmp_path, capsys):
    ade = make_ade20k(str(tmp_path / 'ade'), num_train=2, num_val=1)
    label = osp.join(ade, 'annotations', 'training', 'ADE_train_00000001.png')
    with open(label, 'w') as f:
        f.write('not an image')
    assert check.main(['ade20k', ade]) == 1
    err = capsys.readouterr().err
    assert f'{label} cannot be read as an image' in err and 'Traceback' not in err

    coco = make_coco(str(tmp_path / 'coco'), num_train=2, num_val=1)
    ann = osp.join(coco, 'annotations', 'instances_val2017.json')
    for text, message in (('not json', 'cannot be read as JSON'),
                          ('[]', 'holds a list, not a COCO dict'),
                          ('{"images": [], "annotations": [], "categories": []}',
                           'lists no images'),
                          ('{"images": [{"id": 1}], "annotations": [], "categories": []}',
                           'has image entries without a file_name (1, e.g. entry 0)')):
        with open(ann, 'w') as f:
            f.write(text)
        assert check.main(['coco', coco]) == 1
        err = capsys.readouterr().err
        assert f'{ann} {message}' in err and 'Traceback' not in err


def test_a_split_file_with_a_byte_order_mark_reads_as_without():
    from colora_mm.datasets.vtab1k_layout import read_split
    import tempfile
    with tempfile.NamedTemporaryFile('wb', suffix='.txt', delete=False) as f:
        f.write('\ufeffimages/train/0001.jpg 1\nimages/train/0002.jpg 0\n'.encode())
    try:
        assert read_split(f.name, 4) == [('images/train/0001.jpg', 1),
                                          ('images/train/0002.jpg', 0)]
    finally:
        os.remove(f.name)


def test_a_split_file_that_is_not_text_is_named():
    from colora_mm.datasets import VTABLayoutError
    from colora_mm.datasets.vtab1k_layout import read_split
    import tempfile
    with tempfile.NamedTemporaryFile('wb', suffix='.txt', delete=False) as f:
        f.write(b'images/train/0001.jpg 1\n\xff\xfe\n')
    try:
        with pytest.raises(VTABLayoutError, match='is not UTF-8 text'):
            read_split(f.name, 4)
    finally:
        os.remove(f.name)


@pytest.mark.skipif(shutil.which('unzip') is None or shutil.which('zip') is None,
                    reason='needs zip and unzip')
def test_prepare_ade20k_resumes_an_interrupted_unpack(tmp_path):
    """With the archive there (no download), a rerun after a partial unpack keeps
    what is there, unpacks the rest without asking, and checks the layout."""
    staged = tmp_path / 'src' / 'ADEChallengeData2016'
    shutil.copytree(make_ade20k(str(tmp_path / 'gen'), num_train=2, num_val=1), staged)
    data = tmp_path / 'data'
    (data / 'ade').mkdir(parents=True)
    subprocess.run(['zip', '-q', '-r', str(data / 'ade' / 'ADEChallengeData2016.zip'),
                    'ADEChallengeData2016'], cwd=str(staged.parent), check=True)
    env = dict(os.environ, PYTHON=sys.executable)
    script = osp.join(TOOLS, 'prepare_ade20k.sh')
    first = subprocess.run(['bash', script, str(data)], env=env, capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    unpacked = data / 'ade' / 'ADEChallengeData2016'
    marker = data / 'ade' / '.ADEChallengeData2016.unpacked'
    assert marker.is_file()
    # an unpack that was interrupted: no marker, a folder missing, a file cut short
    marker.unlink()
    shutil.rmtree(unpacked / 'annotations' / 'training')
    image = sorted((unpacked / 'images' / 'training').iterdir())[0]
    whole = image.read_bytes()
    image.write_bytes(whole[:len(whole) // 2])
    again = subprocess.run(['bash', script, str(data)], env=env, capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert 'unpacking' in again.stdout
    assert (unpacked / 'annotations' / 'training').is_dir()
    assert image.read_bytes() == whole and marker.is_file()
    # a completed unpack is not repeated
    third = subprocess.run(['bash', script, str(data)], env=env, capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert third.returncode == 0 and 'unpacking' not in third.stdout, third.stdout
