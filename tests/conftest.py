"""Shared fixtures: the CLI run in-process (most tests) or as the installed console script (one test per contract), and
the work several test files share, built once per session."""
import io, os, sys, subprocess
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
import pytest

os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

# the installed console script, next to this interpreter (as a user runs it)
DIFFPRUNE = str(Path(sys.executable).parent/'diffprune')

@dataclass
class Run:
    "What a `diffprune` run returned and printed."
    returncode: int; stdout: str; stderr: str

def run_main(*args) -> Run:
    "Run `diffprune ARGS` in this process through `diffprune.cli.main`, capturing what it prints."
    from diffprune.cli import main
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err): code = main([str(a) for a in args])
    return Run(code, out.getvalue(), err.getvalue())

def run_console(*args, timeout=600, **kw) -> subprocess.CompletedProcess:
    "Run the installed `diffprune` console script in a subprocess."
    return subprocess.run([DIFFPRUNE, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)

@pytest.fixture
def cli():
    "`cli(*args)`: the CLI in-process (seconds saved per call on importing torch); returns a `Run`."
    return run_main

@pytest.fixture
def console():
    "`console(*args)`: the console script in a subprocess, for the contracts only a real process shows."
    return run_console

@pytest.fixture(scope='session')
def pruned(tmp_path_factory):
    "A model folder: the digits teacher pruned by magnitude at pruning ratio 0.3 (no gradients: quick), built once per session."
    from diffprune.importance import score_model
    from diffprune.prune import prune_model
    d = tmp_path_factory.mktemp('pruned')/'m'
    prune_model(score_model('digits', method='magnitude', progress=False), pruning_ratio=0.3).save(d)
    return d

APART = {'slow': 'minutes of CPU each; the slow tier, run by `pytest -m slow`',
         'browser': 'the widgets in JupyterLab in headless Chromium, run by `pytest -m browser` (.ci/run does)'}

def pytest_configure(config):
    for name, what in APART.items(): config.addinivalue_line('markers', f'{name}: {what}')

def pytest_collection_modifyitems(config, items):
    "Tests marked slow or browser run only when `-m` names their mark; the default run skips them."
    asked = config.getoption('markexpr') or ''
    for name, what in APART.items():
        if name in asked: continue
        skip = pytest.mark.skip(reason=what)
        for item in items:
            if name in item.keywords: item.add_marker(skip)
