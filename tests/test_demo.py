"""The README's main job, `diffprune demo`, at its real settings through the console script (slow tier: about 4 minutes
on two cores; `pytest -m slow`). The default tier runs the same recipe CPU-sized in 08_report and 09_cli."""
import json
import pytest
from diffprune.models import load_model
from diffprune.sizes import count_params

@pytest.mark.slow
def test_demo_halves_the_macs_keeps_fid_near_the_teacher_and_writes_its_report(console, tmp_path):
    r = console('demo', '--out', tmp_path/'demo', timeout=1500)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads((tmp_path/'demo'/'result.json').read_text())
    assert d['pruned']['macs'] <= 0.52 * d['teacher']['macs']
    assert d['pruned']['fid'] < 1.5 * d['teacher']['fid'], (d['pruned']['fid'], d['teacher']['fid'])
    assert count_params(load_model(tmp_path/'demo'/'model')[0]) == d['pruned']['params']
    assert {'report.md', 'samples.png', 'losses.png', 'widths.png'} <= {p.name for p in (tmp_path/'demo').iterdir()}
