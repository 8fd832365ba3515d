"""Every notebook on a fresh machine: from the wheel of this commit, with only what the notebooks' install cells install.

A fresh Colab has torch, but not diffprune, nbdev or transformers' extras. Each notebook's first code cells install
what it imports (`pip install diffprune[...]`). This check proves that they are enough, in three steps:

    python tools/colab_check.py plan nbs/*.ipynb          # the packages the install cells ask for on a fresh machine
    python tools/colab_check.py env ENV nbs/*.ipynb       # build the wheel; a new venv ENV with only those packages
    ENV/bin/python tools/colab_check.py run --whole nbs/10_tutorial_cifar10.ipynb nbs/*.ipynb

`run` copies each notebook alone into an empty folder (no clone beside it, as on Colab), runs its setup cells (up to
and including the first that imports diffprune) in a fresh shell, and fails if an install cell would still install
something (the environment lacks what it asks for) or a cell fails. Notebooks named by `--whole` run whole, at the
default tier (`tst_flags` cells skipped, as `nbdev_test` does).
"""
import argparse, configparser, importlib.util, os, re, shutil, subprocess, sys, tempfile, time, traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALL = "'pip', 'install'"  # what marks an install cell

def cells(path:Path) -> list:
    "The notebook's code cells, in order, as dicts with `source` a string."
    import json
    return [dict(c, source=''.join(c['source'])) for c in json.loads(path.read_text())['cells']
            if c['cell_type'] == 'code']

def setup_cells(path:Path) -> list:
    "The code cells up to and including the first that imports diffprune (or the install cell's next one)."
    cs = cells(path)
    imports = [i for i, c in enumerate(cs) if re.search(r'^\s*(from|import) diffprune', c['source'], re.M)]
    install = [i for i, c in enumerate(cs) if INSTALL in c['source']]
    if not install: raise SystemExit(f"{path.name}: no install cell (a code cell that runs `pip install diffprune...`)")
    end = imports[0] if imports else install[0] + 1
    return cs[:end + 1]

def skip_flags() -> set:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT/'settings.ini')
    return set(cfg['DEFAULT'].get('tst_flags', '').split())

def skipped(source:str, flags:set) -> bool:
    "The cells `nbdev_test` leaves out at the default tier."
    words = {w for l in source.splitlines() if l.startswith('#|') for w in l[2:].split()}
    return bool(words & flags) or ('eval:' in words and 'false' in words)

def _shell(path:Path):
    from execnb.shell import CaptureShell
    return CaptureShell(path, mpl_format='png')

def plan(notebooks) -> list:
    "The pip arguments each install cell runs on a machine where nothing is installed yet; their union."
    asked = []
    real_run, real_find = subprocess.run, importlib.util.find_spec
    subprocess.run = lambda args, **kw: asked.append(args[args.index('install') + 1:]) or None
    importlib.util.find_spec = lambda name, *a: None  # a fresh machine: nothing of what the cell checks is there
    try:
        for nb in notebooks:
            shell = _shell(nb)
            for c in cells(nb):
                if INSTALL in c['source']:
                    shell.run(c['source'])
                    if shell.exc: raise SystemExit(f"{nb.name}: its install cell failed: {shell.exc}")
                    break
                if not c['source'].startswith('#| default_exp'): shell.run(c['source'])  # e.g. a parameter cell
    finally: subprocess.run, importlib.util.find_spec = real_run, real_find
    return sorted({a for args in asked for a in args if a != '-q'})

def env(folder:Path, notebooks):
    "Build this commit's wheel and a new virtual environment with only what the install cells ask for."
    wanted = plan(notebooks)
    dist = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '-w', dist, ROOT], check=True)
    wheel = next(dist.glob('diffprune-*.whl'))
    subprocess.run([sys.executable, '-m', 'venv', folder], check=True)
    pip = [Path(folder)/'bin'/'python', '-m', 'pip', 'install', '-q']
    # a Colab has torch: here its CPU build, pinned as everywhere in this project, stands in for it
    specs = [re.sub(r'^diffprune(?=\[|$)', str(wheel), s) for s in wanted]
    subprocess.run([*pip, '-c', ROOT/'constraints-cpu.txt', 'torch', 'ipywidgets', *specs], check=True)
    print(f"fresh environment {folder}: the wheel {wheel.name} with {', '.join(wanted)}")

def run_notebook(path:Path, whole:bool) -> float:
    "Run `path`'s setup cells (or all of it) alone in an empty folder; returns the seconds; exits on a failure."
    work = Path(tempfile.mkdtemp())
    nb = work/path.name
    shutil.copy(path, nb)
    todo = [c for c in cells(path) if not skipped(c['source'], skip_flags())] if whole else setup_cells(path)
    real_run = subprocess.run
    def refuse(args, **kw):
        if 'pip' in map(str, args): raise RuntimeError(f"the install cell would install {args[-1]}: the wheel "
                                                        "and its extras lack what the cell checks for")
        return real_run(args, **kw)
    subprocess.run = refuse
    shell, t0, cwd = _shell(nb), time.time(), os.getcwd()
    os.chdir(work)
    os.environ['IN_TEST'] = '1'
    try:
        for c in todo:
            shell.run(c['source'])
            if shell.exc:
                why = ''.join(traceback.format_exception(shell.exc))
                raise SystemExit(f"{path.name}: a cell failed on a fresh machine:\n{c['source'][:300]}\n{why}")
    finally:
        subprocess.run = real_run
        os.chdir(cwd)
    import diffprune
    if Path(diffprune.__file__).resolve().is_relative_to(ROOT):
        raise SystemExit(f"diffprune was imported from the clone ({diffprune.__file__}), not from the wheel")
    shutil.rmtree(work, ignore_errors=True)
    return time.time() - t0

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('step', choices=['plan', 'env', 'run'])
    p.add_argument('args', nargs='+', type=Path, help="(env: the venv folder, then) the notebooks")
    p.add_argument('--whole', type=Path, action='append', default=[], help="a notebook to run whole (run)")
    a = p.parse_args(argv)
    if a.step == 'plan': return print(' '.join(plan(a.args)))
    if a.step == 'env': return env(a.args[0], a.args[1:])
    for nb in a.args:
        secs = run_notebook(nb, whole=False)
        print(f'{nb.name}: setup cells ran in {secs:.1f} s', flush=True)
    for nb in a.whole:
        secs = run_notebook(nb, whole=True)
        print(f'{nb.name}: ran whole in {secs:.1f} s', flush=True)

if __name__ == '__main__': main()
