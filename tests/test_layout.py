"""The house: a module imports only modules whose notebooks come earlier in the order a reader learns them."""
import ast, re
from pathlib import Path
import diffprune

ROOT = Path(__file__).resolve().parent.parent

def notebook_order() -> dict:
    "`{module: notebook}` in notebook order, from each notebook's `#| default_exp`."
    order = {}
    for nb in sorted((ROOT/'nbs').glob('[0-9]*.ipynb')):
        if m := re.search(r'#\|\s*default_exp\s+(\w+)', nb.read_text()): order[m.group(1)] = nb.name
    return order

def library_imports(path:Path) -> set:
    "The diffprune modules `path` imports, at the top or inside functions."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            mod = node.module if node.level == 0 else 'diffprune.' + node.module
            if mod.startswith('diffprune.'): found.add(mod.split('.')[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('diffprune.')}
    return found

def test_imports_only_point_forward_in_notebook_order():
    "No circle and no arrow back, with nothing whitelisted: a module imports only modules of earlier notebooks."
    order = notebook_order(); rank = {m: i for i, m in enumerate(order)}
    assert {'checks', 'data', 'files', 'hub', 'family', 'models', 'diffusion', 'metrics', 'sizes', 'prune', 'unet',
            'transformer', 'latent', 'report', 'cli'} <= set(order)
    backward = [f'{m} ({order[m]}) imports {d} ({order[d]})' for m in order
                for d in library_imports(ROOT/'diffprune'/f'{m}.py') if d in rank and rank[d] >= rank[m] and d != m]
    assert not backward, backward

# the modules of the denoiser families: the only ones that may name a denoiser's diffusers class
def _family_modules() -> set:
    "The built-in families' own modules: those of each registered family's class and its bases (04a's UNet, 04e's)."
    from diffprune.family import families
    return {c.__module__.rpartition('.')[2] for f in families() for c in type(f).__mro__
            if c.__module__.startswith('diffprune.') and c.__module__ != 'diffprune.family'}

FAMILIES = _family_modules()
DENOISER_CLASSES = ('UNet2DModel', 'UNet2DConditionModel', 'DiTTransformer2DModel', 'PixArtTransformer2DModel',
                    'Transformer2DModel', 'SD3Transformer2DModel', 'FluxTransformer2DModel', 'SanaTransformer2DModel')

def test_outside_the_family_modules_nothing_branches_on_the_kind_of_denoiser():
    "No `isinstance` on a denoiser class, no `is_transformer`, no `transformer_blocks` outside a family's own module."
    found = []
    for p in sorted((ROOT/'diffprune').glob('*.py')):
        if p.stem in FAMILIES or p.name == '_modidx.py': continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'isinstance':
                names = {n.id if isinstance(n, ast.Name) else getattr(n, 'attr', None) for n in ast.walk(node.args[1])}
                if names & set(DENOISER_CLASSES): found.append(f'{p.name}:{node.lineno} isinstance on {names}')
            if isinstance(node, ast.Name) and node.id == 'is_transformer': found.append(f'{p.name}:{node.lineno}')
            if isinstance(node, ast.Constant) and node.value == 'transformer_blocks': found.append(f'{p.name}:{node.lineno}')
    assert not found, found

def test_no_module_is_over_600_lines():
    "One job per room: every library module stays under 600 lines."
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT/'diffprune').glob('*.py') if p.name != '_modidx.py'}
    assert max(sizes.values()) <= 600, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]

def test_fid_is_computed_in_one_module():
    "Every FID goes through `metrics`: no other module builds a torchmetrics FID or updates its statistics."
    users = sorted(p.stem for p in (ROOT/'diffprune').glob('*.py')
                   if 'FrechetInceptionDistance' in p.read_text() or 'real=True' in p.read_text())
    assert users == ['metrics'], users

PRIVATE_TP = ('_is_atten_group', '_downstream_node_as_root_if_attention', '_get_channel_groups')

def test_torch_pruning_is_within_the_bound_whose_private_api_prune_relies_on():
    "unet.py calls three private MetaPruner methods, in one helper only, so settings.ini bounds torch-pruning's version."
    import configparser, torch_pruning as tp
    from packaging.requirements import Requirement
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini')
    req = next(Requirement(r) for r in cfg['DEFAULT']['requirements'].split() if r.startswith('torch-pruning'))
    assert req.specifier and tp.__version__ in req.specifier, (tp.__version__, str(req.specifier))
    assert any(s.operator == '<' for s in req.specifier), 'no upper bound'
    assert all(hasattr(tp.pruner.MetaPruner, name) for name in PRIVATE_TP)
    src = (ROOT/'diffprune'/'unet.py').read_text()
    helper = src[src.index('    def _rooted('):src.index('    def _narrowest_root(')]
    assert all(src.count(f'.{n}(') == helper.count(f'.{n}(') == 1 for n in PRIVATE_TP)

def test_import_diffprune_as_dp_gives_one_call_per_step_and_loads_no_torch():
    import subprocess, sys
    probe = ("import sys, diffprune as dp; print([m for m in ('torch', 'diffusers') if m in sys.modules]); "
             "import diffprune.importance, diffprune.prune, diffprune.finetuning, diffprune.evaluation, diffprune.models; "
             "print(all(getattr(dp, n) is getattr(getattr(diffprune, m), n) for n, m in [('load_model', 'models'), "
             "('score_model', 'importance'), ('prune_model', 'prune'), ('finetune', 'finetuning'), "
             "('evaluate', 'evaluation')]))")
    out = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, timeout=120).stdout.split()
    assert out == ['[]', 'True'], out

def test_library_lines_fit_119_columns_and_hold_one_statement_each():
    "diffusers' 119 columns and no statements joined with `;`, in 99% of library lines (nbdev writes the rest)."
    import io, tokenize
    lines = long = joined = 0
    for p in (ROOT/'diffprune').glob('*.py'):
        if p.name == '_modidx.py': continue
        src = p.read_text()
        code = [l for l in src.splitlines() if l.strip() and not l.lstrip().startswith('#')]
        tokens = tokenize.generate_tokens(io.StringIO(src).readline)
        lines, long = lines + len(code), long + sum(len(l) > 119 for l in code)
        joined += len({t.start[0] for t in tokens if t.type == tokenize.OP and t.string == ';'})
    assert long <= 0.01 * lines and joined <= 0.01 * lines, dict(lines=lines, long=long, joined=joined)

def test_each_cli_flag_has_one_meaning():
    "A calibration size is --calibration-size; --batch-size is always a training batch; torch-pruning's pruning ratio."
    from diffprune.cli import parser
    subs = parser()._subparsers._group_actions[0].choices
    flags = {name: {o for a in sp._actions for o in a.option_strings} for name, sp in subs.items()}
    assert all('--calibration-size' in flags[n] for n in ('analyze', 'prune', 'run', 'demo'))
    assert not any('--batch-size' in flags[n] for n in ('analyze', 'prune', 'sample', 'evaluate'))
    assert '--pruning-ratio' in flags['prune'] and not any({'--ratio', '--fast'} & f for f in flags.values())
    # --steps counts finetune steps; DDIM steps are --sample-steps wherever a command samples
    assert all('--sample-steps' in flags[n] and '--steps' not in flags[n] for n in ('sample', 'evaluate'))
    assert all({'--steps', '--sample-steps'} <= flags[n] for n in ('run', 'demo'))

def test_every_bench_script_compiles():
    "bench/ is run by hand, not by the tests: a rename must not leave a script that cannot even be parsed."
    import py_compile
    for p in sorted((ROOT/'bench').glob('*.py')): py_compile.compile(str(p), doraise=True)
