"""The house: a module imports only modules whose notebooks come earlier in the order a reader learns them."""
import ast, re
from pathlib import Path

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
    order = notebook_order(); rank = {m: i for i, m in enumerate(order)}
    assert {'data', 'models', 'prune', 'latent', 'report', 'cli'} <= set(order)
    backward = [f'{m} ({order[m]}) imports {d} ({order[d]})' for m in order
                for d in library_imports(ROOT/'diffprune'/f'{m}.py') if d in rank and rank[d] >= rank[m] and d != m]
    assert not backward, backward
