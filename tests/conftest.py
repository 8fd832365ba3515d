import os, sys, subprocess
from pathlib import Path
import pytest

os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

# the installed console script, next to this interpreter (as a user runs it)
DIFFPRUNE = str(Path(sys.executable).parent/'diffprune')

def run_cli(*args, timeout=600, **kw):
    "Run the `diffprune` console script in a subprocess; returns the CompletedProcess."
    return subprocess.run([DIFFPRUNE, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)

@pytest.fixture
def cli(): return run_cli
