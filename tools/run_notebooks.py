"""Run notebooks as `nbdev_test` does, time every cell, and (with `--write`) store the outputs in the notebooks.

The cells that run are the ones `nbdev_test` runs: none flagged with a `tst_flags` word of settings.ini (`slow`,
`colab`, `retrain`) unless `--flags` names it, none with `#| eval: false`, and not the closing `nbdev_export()` cell. With `--write` each notebook is saved with the outputs of that run, so GitHub, Colab
and the docs show the lesson without running it: figures at display size (execnb's retina default would store them
at twice that), each PNG stored with at most 32 colours, a figure's or a table's plain-text twin left out (the
image or the HTML is what every viewer shows), a table's HTML without pandas' style block and indentation. Run `nbdev_clean` afterwards, as before any commit. `--stored` applies
the same to the outputs a notebook already holds, without running it.

    python tools/run_notebooks.py nbs/05_finetuning.ipynb            # time each cell, change nothing
    python tools/run_notebooks.py --write nbs/[0-9]*.ipynb         # refresh the committed outputs
    python tools/run_notebooks.py --write --flags slow nbs/05_finetuning.ipynb  # and those of the slow tier
    python tools/run_notebooks.py --stored nbs/*.ipynb                 # store the committed outputs that way

A `#| slow` cell that this run skips keeps its committed output: the slow tier's result stays visible in the lesson.
"""
import argparse, base64, io, os, re, sys, tempfile, time
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

def slow_tier(cell) -> bool:
    "A cell of the slow tier (`#| slow`): its committed output, from a run with `--flags slow`, is the lesson's result."
    return 'slow' in extract_directives(cell, remove=False)

def run(path:Path, flags:set, write:bool) -> list:
    "Run one notebook in a fresh shell; returns `[(seconds, cell index, first line)]`; raises on the first error."
    os.environ['IN_TEST'] = '1'
    nb, shell, times = read_nb(path), CaptureShell(path, mpl_format='png'), []  # images at display size
    for i, cell in enumerate(nb.cells):  # a slow cell keeps the output of the last run that ran it (`--flags slow`)
        if cell.cell_type == 'code' and skipped(cell, flags) and not slow_tier(cell): cell.outputs = []
    with working_directory(path.parent):
        # diffprune first, as a user's session that imported it has it: it keeps torchao's import-time reports (where
        # torchao is installed, diffusers imports it) out of cells that import diffusers before diffprune
        shell.run('import diffprune')
        for i, cell in enumerate(nb.cells):
            if skipped(cell, flags): continue
            t0 = time.time()
            shell.cell(cell)
            times.append((time.time() - t0, i, cell.source.splitlines()[0] if cell.source else ''))
            if shell.exc: raise RuntimeError(shell.prettytb(fname=path))
    if write:
        store(nb, path)
    return times

def store(nb, path:Path):
    "Write `nb` to `path` with its outputs as a lesson shows them (`clean`, `shrink_png`); refuse a local path."
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != 'code': continue
        cell.outputs = [o for o in map(clean, cell.outputs) if o is not None]
        for out in cell.outputs: shrink_png(out)
        if (where := local_path(cell.outputs)):
            raise RuntimeError(f"{path.name} cell {i} shows a local path ({where}): print paths relative to a "
                               "folder the lesson names, or keep the warning that carries it out of the output")
    write_nb(nb, path)

ANSI = re.compile(r'\x1b\[[0-9;?]*[A-Za-z]')
BAR = re.compile(r'\d+%\|.*\||\d+/\d+ \[\d\d:\d\d<|it/s\]|s/it\]')  # a tqdm line: `40%|####  | 2/5 [00:01<...`
STYLE, SPACE = re.compile(r'<style scoped>.*?</style>\s*', re.S), re.compile(r'>\s+<')
TMP = re.compile(re.escape(tempfile.gettempdir()) + r'/tmp[^/\s\'",)]*')

def clean(out):
    "An output as a lesson shows it: no progress bars, no terminal escapes, temporary folders as `<tmp>`; or None."
    if out.get('output_type') == 'stream':
        raw = ANSI.sub('', ''.join(out['text'])).replace('\r\n', '\n')  # escapes first: a bar's redraw is text
        # each line as a terminal leaves it: a bar redraws itself after \r, so only its last drawing stays
        shown = [next((p for p in reversed(l.split('\r')) if p.strip('\n')), l.split('\r')[-1])
                 for l in re.split(r'(?<=\n)', raw)]
        keep = lambda c: not BAR.search(c) and (c.strip() or c == '\n')  # printed blank lines stay, escapes go
        text = TMP.sub('<tmp>', ''.join(l for l in shown if keep(l))).lstrip('\n')  # no blank line above all
        return dict(out, text=text) if text.strip() else None
    data = out.get('data', {})
    plain = ''.join(data.get('text/plain', ''))
    if 'application/vnd.jupyter.widget-view+json' in data and BAR.search(plain): return None  # a tqdm widget
    for k in ('text/plain', 'text/html', 'text/markdown'):
        if k in data: data[k] = TMP.sub('<tmp>', ANSI.sub('', ''.join(data[k])))
    if 'text/plain' in data and ('image/png' in data or 'text/html' in data): del data['text/plain']  # the twin
    if 'text/html' in data:  # a table's HTML without pandas' per-table style block and the indentation between tags
        data['text/html'] = SPACE.sub('><', STYLE.sub('', data['text/html'])).strip()
    return out

def local_path(outputs) -> str:
    "The first local path in `outputs` (this clone, an installed package, a home folder), or ''."
    text = ' '.join(''.join(o.get('text', '')) + ''.join(''.join(v) for k, v in o.get('data', {}).items()
                                                        if k.startswith('text/')) for o in outputs)
    m = re.search(re.escape(str(ROOT)) + r'|site-packages|/home/\w+|/root/', text)
    return m.group(0) if m else ''


def shrink_png(out):
    "Store an output's PNG with at most 32 colours, optimised (a plot's and a grey sample grid's look, in few bytes)."
    from PIL import Image
    data = out.get('data', {})
    if 'image/png' not in data: return
    raw = base64.b64decode(data['image/png'])
    im, buf = Image.open(io.BytesIO(raw)), io.BytesIO()
    im.convert('RGB').quantize(32, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buf, 'PNG', optimize=True)
    if buf.tell() < len(raw): data['image/png'] = base64.b64encode(buf.getvalue()).decode()

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('notebooks', nargs='+', type=Path)
    p.add_argument('--write', action='store_true', help="save each notebook with this run's outputs")
    p.add_argument('--flags', default='', help="space-separated flags to run too, e.g. 'slow'")
    p.add_argument('--top', type=int, default=5, help="slowest cells to list per notebook")
    p.add_argument('--stored', action='store_true', help="store the outputs a notebook holds as --write would, no run")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if a.stored:
        for nb in a.notebooks: store(read_nb(nb), nb)
        return
    total = 0.
    for nb in a.notebooks:
        t0 = time.time(); times = run(nb.resolve(), set(a.flags.split()), a.write); secs = time.time() - t0; total += secs
        print(f'{nb.name}: {secs:.1f} s', flush=True)
        for s, i, first in sorted(times, reverse=True)[:a.top]: print(f'    cell {i:>3}: {s:6.1f} s  {first[:70]}', flush=True)
    print(f'total {total:.1f} s')

if __name__ == '__main__': main()
