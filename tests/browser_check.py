"""Widgets in a real browser: JupyterLab in headless Chromium runs notebooks and the widgets must render and respond.

Starts JupyterLab on a copy of a notebook folder (so nothing is saved into the repository): by default
`tests/browser_notebooks/`, two small notebooks that build the widgets of 02_timesteps and 04_prune in seconds; with
`--source nbs` the lessons themselves. It opens each notebook in Debian's
Chromium through Playwright (no browser of its own is downloaded), runs all cells from the Run menu, and then:
- no cell raised (no error output),
- each widget in `WIDGETS` rendered as a real widget view (a slider, not its text repr),
- moving the slider by keyboard makes the kernel redraw: the watched text changes.
A screenshot of every notebook is kept in `--artifacts` (default `tests/artifacts/browser/`).

    python tests/browser_check.py [--chromium /usr/bin/chromium]
    python tests/browser_check.py --source nbs --notebooks 02_timesteps 04_prune 06_evaluation
"""
import argparse, hashlib, json, os, re, shutil, socket, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# notebook: (slider description to move, CSS selector of the text the kernel must change in response)
WIDGETS = {
    'threshold_explorer': ('threshold', '.widget-output img'),  # the plot's threshold line moves with every step
    'prune_explorer': ('MACs kept', '.jp-OutputArea-child .jp-OutputArea-output table'),
    '02_timesteps': ('threshold', '.widget-html-content'),
    '04_prune': ('MACs kept', '.jp-OutputArea-child .jp-OutputArea-output table'),
    '06_evaluation': ('seed', '.widget-html-content'),
}
CHROMIUM_FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage']

class BrowserCheckError(Exception): pass

def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def lab_settings(d:Path):
    "User settings: no autosave, and every cell in the DOM (no windowing), so the check sees the whole notebook."
    for name, val in {'@jupyterlab/docmanager-extension/plugin': {'autosave': False},
                      '@jupyterlab/notebook-extension/tracker': {'windowingMode': 'none'},
                      '@jupyterlab/apputils-extension/notification': {'fetchNews': 'false', 'checkForUpdates': False}}.items():
        p = d/(name + '.jupyterlab-settings'); p.parent.mkdir(parents=True, exist_ok=True); p.write_text(json.dumps(val))

class Lab:
    "A JupyterLab server on a copy of the notebook folder `source`, as a context manager."
    def __init__(self, work:Path, source:Path, timeout=120):
        self.work, self.source, self.timeout, self.port, self.token = work, source, timeout, free_port(), 'diffprune-browser-check'
    def __enter__(self):
        shutil.copytree(self.source, self.work/'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints', '_*'))
        shutil.copy(ROOT/'settings.ini', self.work)  # the notebooks' last cell exports, into this copy's diffprune/
        lab_settings(self.work/'settings')
        self.log = open(self.work/'lab.log', 'w')
        env = dict(os.environ, MPLBACKEND='module://matplotlib_inline.backend_inline', JUPYTERLAB_SETTINGS_DIR=str(self.work/'settings'))
        self.proc = subprocess.Popen([sys.executable, '-m', 'jupyter', 'lab', '--no-browser', f'--port={self.port}', '--ip=127.0.0.1',
                                      f'--ServerApp.token={self.token}', f'--ServerApp.root_dir={self.work/"nbs"}', '--allow-root',
                                      f'--LabApp.user_settings_dir={self.work/"settings"}', '--LabApp.news_url=',
                                      '--ServerApp.open_browser=False'], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        import urllib.request
        t0 = time.time()
        while True:
            try: urllib.request.urlopen(f'http://127.0.0.1:{self.port}/api/status?token={self.token}', timeout=5); return self
            except OSError:
                if self.proc.poll() is not None or time.time() - t0 > self.timeout:
                    raise BrowserCheckError(f'JupyterLab did not start; see {self.work/"lab.log"}')
                time.sleep(0.5)
    def url(self, nb:str) -> str: return f'http://127.0.0.1:{self.port}/lab/tree/{nb}.ipynb?token={self.token}&reset'
    def __exit__(self, *exc):
        self.proc.terminate()
        try: self.proc.wait(20)
        except subprocess.TimeoutExpired: self.proc.kill()
        self.log.close()

def wait_for(cond, timeout, what, poll=1.0):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout: raise BrowserCheckError(f'timed out after {timeout}s waiting for {what}')
        time.sleep(poll)

def run_all(page, nb:str, timeout:float):
    "Once the kernel is idle, run all cells from the Run menu; wait until every code cell has run (or one raised)."
    page.locator('.jp-Notebook .jp-Cell').first.wait_for(timeout=60_000)
    idle = page.locator('.jp-StatusBar-TextItem', has_text='Idle')
    wait_for(lambda: idle.count() > 0, 120, f'the kernel of {nb} to start')
    prompts = page.locator('.jp-CodeCell .jp-InputArea-prompt')
    started = lambda: any(re.search(r'\[(\*|\d+)\]', t) for t in prompts.all_text_contents())
    for attempt in range(3):  # a click while the menu opens can be lost: try again if nothing started
        page.locator('.lm-MenuBar-itemLabel', has_text='Run').first.click()
        page.locator('.lm-Menu-itemLabel', has_text='Run All Cells').first.click()
        try: wait_for(started, 20, f'{nb} to start running'); break
        except BrowserCheckError:
            if attempt == 2: raise
            page.keyboard.press('Escape')
    def done():
        texts = prompts.all_text_contents()
        if any('*' in t for t in texts): return False
        return bool(errors(page)) or all(re.search(r'\[\d+\]', t) for t in texts)  # Run All stops at an error
    wait_for(done, timeout, f'all cells of {nb} to run')

def errors(page) -> list:
    return page.locator('[data-mime-type="application/vnd.jupyter.error"]').all_text_contents()

def check_notebook(page, lab:Lab, nb:str, artifacts:Path, timeout:float) -> dict:
    page.goto(lab.url(nb)); t0 = time.time()
    run_all(page, nb, timeout)
    errs = errors(page)
    if errs: raise BrowserCheckError(f'{nb}: a cell raised: {errs[0][:300]}')
    desc, watch = WIDGETS[nb]
    if page.get_by_text('Error displaying widget').count(): raise BrowserCheckError(f'{nb}: "Error displaying widget"')
    slider = page.locator('.widget-slider', has=page.locator('.widget-label', has_text=desc)).first
    slider.wait_for(timeout=30_000)
    slider.scroll_into_view_if_needed()
    handle = slider.locator('.noUi-handle').first
    readout = slider.locator('.widget-readout').first
    box = slider.locator('xpath=ancestor::div[contains(@class,"widget-vbox")][1]')
    html = lambda: box.locator(watch).first.evaluate('e => e.outerHTML')  # text, or an image's data
    before_value, before = readout.text_content(), html()
    handle.focus(); handle.press('ArrowRight')
    wait_for(lambda: readout.text_content() != before_value, 30, f'{nb}: the slider to move')
    wait_for(lambda: box.locator(watch).count() > 0 and html() != before, timeout,
             f'{nb}: the kernel to redraw after the slider moved')
    wait_for(lambda: page.locator('.jp-StatusBar-TextItem', has_text='Idle').count() > 0, timeout, f'{nb}: the kernel to finish redrawing')
    time.sleep(1)  # let the browser paint the new output
    after_value, after = readout.text_content(), html()
    shown = lambda h: re.sub(r'<[^>]+>|\s+', ' ', h).strip()[:60] or f'image sha1 {hashlib.sha1(h.encode()).hexdigest()[:10]}'
    artifacts.mkdir(parents=True, exist_ok=True)
    box.scroll_into_view_if_needed(); shot = artifacts/f'{nb}.png'
    box.screenshot(path=str(shot))
    page.screenshot(path=str(artifacts/f'{nb}_page.png'))
    return dict(notebook=nb, seconds=round(time.time() - t0, 1), slider=desc, before=(before_value, shown(before)),
                after=(after_value, shown(after)), screenshot=str(shot))

def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--source', default=str(ROOT/'tests'/'browser_notebooks'), help="folder of the notebooks")
    p.add_argument('--notebooks', nargs='+', default=['threshold_explorer', 'prune_explorer'], choices=list(WIDGETS))
    p.add_argument('--chromium', default=os.environ.get('DIFFPRUNE_CHROMIUM', '/usr/bin/chromium'))
    p.add_argument('--artifacts', default=str(ROOT/'tests'/'artifacts'/'browser'))
    p.add_argument('--timeout', type=float, default=900, help="seconds for one notebook to run")
    a = p.parse_args(argv)
    if not Path(a.chromium).exists(): raise BrowserCheckError(f'no Chromium at {a.chromium}: apt-get install chromium, or pass --chromium')
    from playwright.sync_api import sync_playwright
    results = []
    with tempfile.TemporaryDirectory() as tmp, Lab(Path(tmp), Path(a.source)) as lab, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=a.chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={'width': 1400, 'height': 1000})
            for nb in a.notebooks:
                r = check_notebook(page, lab, nb, Path(a.artifacts), a.timeout); results.append(r)
                print(f"{nb}: ran in {r['seconds']}s; '{r['slider']}' {r['before'][0]} -> {r['after'][0]} redrew: "
                      f"{r['before'][1]!r} -> {r['after'][1]!r}; screenshot {r['screenshot']}", flush=True)
        finally: browser.close()
    return results

if __name__ == '__main__':
    try: main()
    except BrowserCheckError as e: sys.exit(f'browser check failed: {e}')
