"""The notebooks' widgets (ThresholdExplorer, PruneExplorer) in a real browser (JupyterLab + Debian's headless Chromium),
through tests/browser_check.py on the small notebooks in tests/browser_notebooks/.

Marked `browser`: run by `pytest -m browser`, which .ci/run does after the README's test command (JupyterLab and a
browser take half a minute, and many machines have no Chromium). Skipped where Chromium is not installed, unless
DIFFPRUNE_REQUIRE_BROWSER=1 (set by .ci/run, which installs it): then a missing browser fails instead. Screenshots are
kept in tests/artifacts/browser/.
"""
import os, subprocess, sys
from pathlib import Path
import pytest

HERE = Path(__file__).parent
CHROMIUM = os.environ.get('DIFFPRUNE_CHROMIUM', '/usr/bin/chromium')
required = os.environ.get('DIFFPRUNE_REQUIRE_BROWSER') == '1'

@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists() and not required, reason=f'no Chromium at {CHROMIUM} (apt-get install chromium)')
def test_widgets_render_and_respond_in_jupyterlab(tmp_path):
    art = HERE/'artifacts'/'browser'
    for f in art.glob('*.png'): f.unlink()
    r = subprocess.run([sys.executable, str(HERE/'browser_check.py'), '--chromium', CHROMIUM, '--artifacts', str(art)],
                       capture_output=True, text=True, timeout=900)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-1000:]
    for nb in ('threshold_explorer', 'prune_explorer'):
        line = next(l for l in r.stdout.splitlines() if l.startswith(nb + ':'))
        assert 'redrew' in line, line
        shot = art/f'{nb}.png'
        assert shot.exists() and shot.stat().st_size > 5000, f'{shot} missing or empty'

@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists() and not required, reason=f'no Chromium at {CHROMIUM} (apt-get install chromium)')
def test_lesson_widgets_render_and_respond_in_jupyterlab():
    "The slow tier: the lessons themselves (02, 04, 06) run top to bottom in JupyterLab, and each slider redraws."
    art = HERE/'artifacts'/'browser_lessons'
    nbs = ('02_timesteps', '04_prune', '06_evaluation')
    r = subprocess.run([sys.executable, str(HERE/'browser_check.py'), '--chromium', CHROMIUM, '--artifacts', str(art),
                        '--source', str(HERE.parent/'nbs'), '--notebooks', *nbs], capture_output=True, text=True, timeout=1800)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-1000:]
    for nb in nbs: assert 'redrew' in next(l for l in r.stdout.splitlines() if l.startswith(nb + ':'))
