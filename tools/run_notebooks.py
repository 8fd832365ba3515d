"""Run notebooks as `nbdev_test` does, time every cell, and (with `--write`) store the outputs in the notebooks.

The cells that run are the ones `nbdev_test` runs: none flagged with a `tst_flags` word of settings.ini (`slow`,
`colab`, `retrain`) unless `--flags` names it, none with `#| eval: false`, and not the closing `nbdev_export()` cell. With `--write` each notebook is saved with the outputs of that run, so GitHub, Colab
and the docs show the lesson without running it: figures at display size (execnb's retina default would store them
at twice that), each PNG stored with at most 256 colours. Run `nbdev_clean` afterwards, as before any commit.

    python tools/run_notebooks.py nbs/05_finetuning.ipynb            # time each cell, change nothing
    python tools/run_notebooks.py --write nbs/[0-9]*.ipynb         # refresh the committed outputs
"""
import argparse, base64, io, os, sys, time
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from fastcore.xtras import working_directory
from nbdev.config import get_config
from nbdev.process import extract_directives

ROOT = Path(__file__).resolve().parent.parent

def skipped(cell, flags:set) -> bool:
    "True for the cells `nbdev_test` skips."
    if cell.cell_type != 'code': return True
    if 'nbdev_export' + '(' in cell.source: return True
    d = extract_directives(cell, remove=False)
    if d.get('eval:', [''])[0].lower() == 'false': return True
    return bool((set(get_config().tst_flags.split()) - flags) & d.keys())

def run(path:Path, flags:set, write:bool) -> list:
    "Run one notebook in a fresh shell; returns `[(seconds, cell index, first line)]`; raises on the first error."
    os.environ['IN_TEST'] = '1'
    nb, shell, times = read_nb(path), CaptureShell(path, mpl_format='png'), []  # images at display size
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == 'code' and skipped(cell, flags): cell.outputs = []
    with working_directory(path.parent):
        for i, cell in enumerate(nb.cells):
            if skipped(cell, flags): continue
            t0 = time.time()
            shell.cell(cell)
            times.append((time.time() - t0, i, cell.source.splitlines()[0] if cell.source else ''))
            if shell.exc: raise RuntimeError(shell.prettytb(fname=path))
    if write:
        for cell in nb.cells:
            for out in cell.get('outputs', []): shrink_png(out)
        write_nb(nb, path)
    return times

def shrink_png(out):
    "Store an output's PNG with at most 256 colours, optimised (a plot's look, at a third of the bytes)."
    from PIL import Image
    data = out.get('data', {})
    if 'image/png' not in data: return
    raw = base64.b64decode(data['image/png'])
    im, buf = Image.open(io.BytesIO(raw)), io.BytesIO()
    im.convert('RGB').quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buf, 'PNG', optimize=True)
    if buf.tell() < len(raw): data['image/png'] = base64.b64encode(buf.getvalue()).decode()

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('notebooks', nargs='+', type=Path)
    p.add_argument('--write', action='store_true', help="save each notebook with this run's outputs")
    p.add_argument('--flags', default='', help="space-separated flags to run too, e.g. 'slow'")
    p.add_argument('--top', type=int, default=5, help="slowest cells to list per notebook")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    total = 0.
    for nb in a.notebooks:
        t0 = time.time(); times = run(nb.resolve(), set(a.flags.split()), a.write); secs = time.time() - t0; total += secs
        print(f'{nb.name}: {secs:.1f} s', flush=True)
        for s, i, first in sorted(times, reverse=True)[:a.top]: print(f'    cell {i:>3}: {s:6.1f} s  {first[:70]}', flush=True)
    print(f'total {total:.1f} s')

if __name__ == '__main__': main()
