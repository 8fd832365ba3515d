"Shared helpers of the benchmark scripts: argument parsing, JSON output, plain tables."
import argparse, json, math, platform, statistics, time, os
from pathlib import Path
import torch

def parser(desc):
    p = argparse.ArgumentParser(description=desc)
    p.add_argument('--out', default=str(Path(__file__).parent/'results'), help="folder for the JSON results")
    p.add_argument('--seed', type=int, default=0)
    return p

def machine() -> dict:
    return dict(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine(), cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)

ROOT = Path(__file__).resolve().parent.parent

def portable(v):
    "`v` with every absolute path made relative to the repository (the machine's own paths stay out of the results)."
    if isinstance(v, dict): return {k: portable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)): return [portable(x) for x in v]
    if isinstance(v, str) and os.path.isabs(v):
        p = Path(v).resolve()
        return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name
    return v

def write(out, name, result:dict):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    p = out/f'{name}.json'
    tmp = p.with_suffix('.tmp')
    tmp.write_text(json.dumps(portable(dict(result, machine=machine(), date=time.strftime('%Y-%m-%d'))), indent=2))
    os.replace(tmp, p)
    print(f'wrote {p}')

def table(rows:list, cols:list) -> str:
    "A plain-text table of dict rows."
    fmt = lambda v: f'{v:.4g}' if isinstance(v, float) else str(v)
    w = {c: max(len(c), *(len(fmt(r.get(c, ''))) for r in rows)) for c in cols}
    lines = ['  '.join(c.rjust(w[c]) for c in cols)]
    lines += ['  '.join(fmt(r.get(c, '')).rjust(w[c]) for c in cols) for r in rows]
    return '\n'.join(lines)

def pruned_digits(targets, round_to=(), device='cpu', seed:int=0) -> dict:
    "The digits teacher and copies pruned (Diff-Pruning, thr 0.05) to each MACs target, plain and with each `round_to`."
    from diffprune.models import load_model
    from diffprune.importance import score_model
    from diffprune.prune import prune_model
    imp = score_model('digits', stride=5, calibration_size=32, seed=seed, progress=False)
    models = {'teacher': load_model('digits', device)}
    for t in targets:
        for n in (None, *round_to):
            r = prune_model(imp, target_macs=t, round_to=n)
            models[f'{t:.2f}' + (f' round_to={n}' if n else '')] = (r.unet.to(device).eval(), r.scheduler)
    return models

def paired(runs:dict, base:str, other:str) -> dict:
    "`other`'s median ms in interleaved `runs` and its paired speedup over `base` (`paired_speedup`)."
    import statistics
    from diffprune.evaluation import paired_speedup
    return dict(ms=statistics.median(runs[other]), **paired_speedup(runs, base, other))

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086}

def ci95(xs):
    "Mean, std and half-width of the 95% t-interval."
    n = len(xs)
    m = statistics.mean(xs)
    if n < 2: return m, 0., float('nan')
    sd = statistics.stdev(xs)
    return m, sd, T975.get(n - 1, 1.96) * sd / math.sqrt(n)
