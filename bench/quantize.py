"""Pruning and quantization on one model, alone and together (issue #31): weight bytes, CPU latency and FID.

For the digits UNet and the digits DiT (the shipped teachers), per seed, six arms side by side:
- `teacher`, and `pruned`: Diff-Pruning scores (thr 0.05), width pruning to `--target` of the MACs, finetuned
  `--finetune-steps` at batch 64 with EMA (the same settings and seed for both models);
- each of them quantized by torchao (`diffprune.quantize`): `int8-weight` and `int8-dynamic`; the teacher's weights as
  they are, the pruned model's after its finetune (quantization-aware finetuning is not part of this).
Weight bytes as stored (`weight_bytes`: int8 values and scales for quantized layers); forward ms at each of `--batches`
on the CPU, the six arms' runs interleaved (paired speedup over the teacher); FID of `--samples` DDIM-50 samples from
the same noise (digits features, against all digits), paired by seed against the arm without quantization.

Peak memory: the peak resident memory of a fresh process that loads each arm (quantizing it there) and runs one forward
pass at the largest batch, and how much the forward pass added. At these sizes a process that imports torch and
diffusers holds some hundreds of MB and the digits models 3-5 MB of weights, so the weight bytes are the memory that
scales with a model, and the peak shows how little of the process the model is.

    python bench/quantize.py            # 2 seeds, 500 finetune steps, 512 samples: about 25 minutes on 2 cores
    python bench/quantize.py --quick    # seconds: tiny settings that check the plumbing, not the result
    python bench/quantize.py --gpu --device cuda   # fp8 and int8 on CUDA: latency and bytes only (bench/gpu.sh)
"""
import copy, json, statistics, time
from pathlib import Path
import torch
from common import parser, write, table, ci95, seeded_args, seeded_runs, paired
from diffprune.models import load_model
from diffprune.diffusion import ddim_sample
from diffprune.importance import score_model
from diffprune.prune import prune_model
from diffprune.finetuning import finetune
from diffprune.metrics import fid_score
from diffprune.quantize import quantize, weight_bytes

MODELS = ('digits', 'digits-dit')
SCHEMES = ('int8-weight', 'int8-dynamic')

def arms(teacher, pruned, schemes=SCHEMES) -> dict:
    "`{arm: (model, scheduler)}`: the teacher and the pruned model, plain and quantized by each scheme."
    out = {'teacher': teacher, 'pruned': pruned}
    for s in schemes:
        out[f'teacher+{s}'] = (quantize(copy.deepcopy(teacher[0]), s), teacher[1])
        out[f'pruned+{s}'] = (quantize(copy.deepcopy(pruned[0]), s), pruned[1])
    return out

def pruned_finetuned(name:str, teacher, a, seed:int):
    "The teacher pruned by Diff-Pruning to `a.target` of its MACs and finetuned, `(model, scheduler)` and its MACs."
    scored = score_model(teacher, 'digits', calibration_size=a.calibration_size, stride=a.stride, seed=seed,
                         progress=False)
    pr = prune_model(scored, target_macs=a.target)
    ft = finetune((pr.denoiser, pr.scheduler), 'digits', a.finetune_steps, a.batch_size, seed=seed, progress=False)
    return (ft.denoiser.eval(), ft.scheduler), pr.macs_after / pr.macs_before

def run(seed:int, a) -> list:
    "FID and weight bytes of every arm of both models, for one seed."
    rows = []
    for name in MODELS:
        teacher = load_model(name)
        pruned, macs = pruned_finetuned(name, teacher, a, seed)
        for arm, (m, s) in arms(teacher, pruned).items():
            t0 = time.time()
            x = ddim_sample(m, s, a.samples, 50, seed, progress=False)
            rows.append(dict(model=name, arm=arm, seed=seed, fid=fid_score(x, 'digits:all'), bytes=weight_bytes(m),
                             macs_fraction=1. if arm.startswith('teacher') else macs, seconds=time.time() - t0))
            print(rows[-1], flush=True)
    return rows

def summarise(runs:list) -> list:
    "Mean FID per model and arm with its interval; each quantized arm's paired difference to the arm it quantizes."
    out = []
    for name in MODELS:
        by = lambda arm: {r['seed']: r for r in runs if r['model'] == name and r['arm'] == arm}  # noqa: E731
        for arm in dict.fromkeys(r['arm'] for r in runs if r['model'] == name):
            rs = list(by(arm).values())
            m, _, hw = ci95([r['fid'] for r in rs])
            row = dict(model=name, arm=arm, n=len(rs), fid_mean=m, fid_ci95=hw, mb=rs[0]['bytes'] / 1e6,
                       macs_fraction=rs[0]['macs_fraction'])
            if '+' in arm:
                base = by(arm.split('+')[0])
                dm, _, dhw = ci95([r['fid'] - base[s]['fid'] for s, r in by(arm).items() if s in base])
                row.update(minus_plain_mean=dm, minus_plain_ci95=dhw)
            out.append(row)
    return out

def speed(a, device='cpu', schemes=SCHEMES) -> list:
    "Forward ms of every arm and its paired speedup over the teacher (pruned: the Diff-Pruning plan, not finetuned)."
    from diffprune.evaluation import latency_runs
    rows = []
    for name in MODELS:
        teacher = load_model(name, device)
        scored = score_model(teacher, 'digits', calibration_size=a.calibration_size, stride=a.stride, seed=a.seed,
                             progress=False)
        pr = prune_model(scored, target_macs=a.target)
        models = arms(teacher, (pr.denoiser.to(device).eval(), pr.scheduler), schemes)
        for batch in a.batches:
            with torch.no_grad(): runs = latency_runs(models, batch, a.repeats, warmup=2)
            for arm, (m, _) in models.items():
                rows.append(dict(model=name, arm=arm, batch=batch, mb=weight_bytes(m) / 1e6,
                                 **paired(runs, 'teacher', arm)))
                print(rows[-1], flush=True)
    return rows

CHILD = """
import json, resource, sys, torch
import diffprune
from diffprune.models import load_model
from diffprune.quantize import quantize
from diffprune.sizes import example_inputs
folder, scheme, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, _ = load_model(folder)
if scheme != 'none': quantize(model, scheme)
torch.manual_seed(0)
x = example_inputs(model, batch)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad(): model(**x)
print(json.dumps(dict(loaded_kb=loaded, peak_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))
"""

def memory(a) -> list:
    "Peak resident memory of a fresh process that loads each arm and runs one forward pass at the largest batch."
    import subprocess, sys, tempfile
    from diffprune.models import save_model
    rows, tmp = [], Path(tempfile.mkdtemp())
    for name in MODELS:
        teacher = load_model(name)
        scored = score_model(teacher, 'digits', calibration_size=a.calibration_size, stride=a.stride, seed=a.seed,
                             progress=False)
        save_model(prune_model(scored, target_macs=a.target).denoiser, teacher[1], tmp/name)
        for arm in ('teacher', 'pruned', *(f'{m}+{s}' for m in ('teacher', 'pruned') for s in SCHEMES)):
            folder = name if arm.startswith('teacher') else str(tmp/name)
            scheme = arm.split('+')[1] if '+' in arm else 'none'
            r = subprocess.run([sys.executable, '-c', CHILD, folder, scheme, str(max(a.batches))], capture_output=True,
                               text=True, timeout=600)
            if r.returncode: raise SystemExit(r.stderr[-2000:])
            kb = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(dict(model=name, arm=arm, batch=max(a.batches), peak_mb=kb['peak_kb'] / 1024,
                             forward_mb=(kb['peak_kb'] - kb['loaded_kb']) / 1024))
            print(rows[-1], flush=True)
    return rows

def verdicts(summary:list, speeds:list) -> list:
    lines = []
    for r in summary:
        if '+' not in r['arm']: continue
        d, hw = r['minus_plain_mean'], r['minus_plain_ci95']
        what = f"{r['model']} {r['arm']} against {r['arm'].split('+')[0]}: "
        if hw != hw: lines.append(what + f"one seed, no interval ({d:+.2f} FID)")
        elif abs(d) > hw: lines.append(what + f"FID {'worse' if d > 0 else 'better'} by {d:+.2f} +/- {hw:.2f} (95%)")
        else: lines.append(what + f"no FID difference shown ({d:+.2f} +/- {hw:.2f}, 95%, {r['n']} seeds)")
    for r in speeds:
        if r['arm'] != 'teacher':
            lines.append(f"{r['model']} {r['arm']} at batch {r['batch']}: {r['speedup']:.2f}x the teacher's speed, "
                         f"{r['mb']:.2f} MB of weights")
    return lines

if __name__ == '__main__':
    p = parser(__doc__.split('\n')[0])
    p.add_argument('--gpu', action='store_true', help="latency and bytes on `--device` with fp8 too, no FID")
    p.add_argument('--device', default='cpu')
    p.add_argument('--memory-only', action='store_true', help="add peak memory to the results of a full run")
    gpu = p.parse_known_args()[0].gpu
    a = seeded_args(p, 'quantize_gpu' if gpu else 'quantize', seeds=2, finetune_steps=500)
    a.batches = [1] if a.quick else [1, 16] if not gpu else [1, 64]
    if a.gpu:
        fp8 = a.device == 'cuda' and torch.cuda.get_device_capability() >= (8, 9)  # fp8 units: L4, 4090, H100, H200
        rows = speed(a, a.device, SCHEMES + (('fp8',) if fp8 else ()))
        print(table(rows, ['model', 'arm', 'batch', 'mb', 'ms', 'speedup']))
        write(a.out, a.name + ('' if a.device == 'cpu' else f'_{a.device}'), dict(speed=rows, args=vars(a)))
        raise SystemExit(0)
    if a.memory_only:  # added to the results of a full run (its FID and speed kept)
        res = json.loads((Path(a.out)/f'{a.name}.json').read_text())
        res['memory'] = memory(a)
        print(table(res['memory'], ['model', 'arm', 'batch', 'peak_mb', 'forward_mb']))
        write(a.out, a.name, {k: v for k, v in res.items() if k not in ('machine', 'date')})
        raise SystemExit(0)
    runs = seeded_runs(a, lambda seed: run(seed, a))
    summary = summarise(runs)
    print(table(summary, ['model', 'arm', 'n', 'fid_mean', 'fid_ci95', 'minus_plain_mean', 'minus_plain_ci95', 'mb']))
    speeds = speed(a)
    print(table(speeds, ['model', 'arm', 'batch', 'mb', 'ms', 'speedup', 'speedup_low', 'speedup_high']))
    lines = verdicts(summary, speeds)
    print('\n'.join(lines))
    mem = memory(a)
    print(table(mem, ['model', 'arm', 'batch', 'peak_mb', 'forward_mb']))
    write(a.out, a.name, dict(summary=summary, runs=runs, speed=speeds, memory=mem, verdicts=lines, args=vars(a)))
    (Path(a.out)/f'{a.name}.partial.json').unlink(missing_ok=True)
