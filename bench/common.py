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
            models[f'{t:.2f}' + (f' round_to={n}' if n else '')] = (r.denoiser.to(device).eval(), r.scheduler)
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

def seeded_args(p, name:str, seeds:int, finetune_steps:int):
    "The settings every finetune-and-FID benchmark shares, on parser `p`; `--quick` shrinks them to a plumbing check."
    p.add_argument('--seeds', type=int, default=seeds)
    p.add_argument('--target', type=float, default=0.5, help="fraction of the MACs to keep")
    p.add_argument('--finetune-steps', type=int, default=finetune_steps)
    p.add_argument('--batch-size', type=int, default=64, help="finetune batch")
    p.add_argument('--samples', type=int, default=512)
    p.add_argument('--calibration-size', type=int, default=32)
    p.add_argument('--stride', type=int, default=5)
    p.add_argument('--batches', type=int, nargs='+', default=[1, 64], help="forward batches timed")
    p.add_argument('--repeats', type=int, default=15)
    p.add_argument('--quick', action='store_true', help="tiny settings: one seed, 2 steps, 16 samples")
    p.add_argument('--name', default=None, help=f"results file name (default: {name}, or {name}_quick)")
    a = p.parse_args()
    if a.quick:
        a.seeds, a.finetune_steps, a.batch_size, a.samples = 1, 2, 8, 16
        a.calibration_size, a.stride, a.batches, a.repeats = 8, 100, [1], 2
    a.name = a.name or (f'{name}_quick' if a.quick else name)
    return a

def seeded_runs(a, run) -> list:
    "`run(seed)`'s rows for every seed, kept in `{name}.partial.json` as each seed ends, so a rerun goes on from there."
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out/f'{a.name}.partial.json'
    runs = json.loads(partial.read_text()) if partial.exists() else []
    for seed in range(a.seed, a.seed + a.seeds):
        if any(r['seed'] == seed for r in runs): continue
        runs += run(seed)
        partial.write_text(json.dumps(runs))
    return runs

def speed_rows(models:dict, a, key:str) -> list:
    "Forward ms, paired speedup over `models['teacher']` and its share of the MACs ratio, per model and `a.batches`."
    from diffprune.sizes import count_macs, count_params
    from diffprune.evaluation import latency_runs
    m0, rows = count_macs(models['teacher'][0]), []
    for batch in a.batches:
        with torch.no_grad(): runs = latency_runs(models, batch, a.repeats, warmup=2)
        for k, (u, _) in models.items():
            f, macs = paired(runs, 'teacher', k), count_macs(u)
            rows.append({key: k, 'batch': batch, 'params': count_params(u), 'macs_reduction': m0 / macs,
                         'forward_ms': f['ms'], 'speedup': f['speedup'], 'speedup_low': f['speedup_low'],
                         'speedup_high': f['speedup_high'], 'vs_macs': f['speedup'] * macs / m0})
    return rows
