"""Depth against width for UNets (issue #30): FID after the same finetune at equal MACs, and speed against MACs.

FID (digits teacher, Diff-Pruning scores, thr 0.05): for each seed, four arms at two MACs levels:
- `depth`: the fewest lowest-scored units that reach `--depth-target` (0.95: the digits teacher has two units, the
  last level's pair and the mid-block, and removing both leaves 90% of the MACs);
- `width@depth`: width pruning to the MACs `depth` reached, so both carry the same compute;
- `both`: units and width to `--target` (0.5), depth taking about half the reduction;
- `width`: width pruning to the MACs `both` reached.
Each is finetuned with the same settings and seed (`--finetune-steps` at batch 64, EMA), then `--samples` DDIM-50
samples from the same noise are scored by FID (digits features, against all digits). Differences are paired by seed
(depth minus width@depth, both minus width), with a 95% t-interval.

Speed: forward ms of the teacher and each pruned model, interleaved runs, eager fp32 (`paired_speedup`), against the
MACs reduction, for the digits arms of the first seed and for the CIFAR-10 config (random weights, magnitude scores):
its BK-SDM-Small preset (a pair at each of its four levels and the mid-block, a plain diffusers config), width
pruning to the same MACs, and both. With `--sd15 --device cuda` (bench/gpu.sh) it times an SD-1.5-sized
UNet2DConditionModel instead (random weights, 64x64 latents, fp16, batch 1 and 8, eager and compiled): teacher,
`bk-sdm-small`, width at its MACs.

    python bench/unet_depth.py              # 3 seeds, 500 finetune steps, 512 samples: about 20 minutes on 2 cores
    python bench/unet_depth.py --quick      # seconds: tiny settings that check the plumbing, not the result
    python bench/unet_depth.py --sd15 --device cuda   # the GPU measurement (bench/gpu.sh runs it)
"""
import copy, statistics, time
from pathlib import Path
import torch
from common import parser, write, table, ci95, seeded_args, seeded_runs, speed_rows
from diffusers import DDPMScheduler, UNet2DModel, UNet2DConditionModel
from diffprune.models import load_model, CIFAR10_CONFIG
from diffprune.diffusion import ddim_sample
from diffprune.importance import score_model, ScoredModel, importance_criterion
from diffprune.prune import prune_model
from diffprune.finetuning import finetune
from diffprune.metrics import fid_score

PAIRS = (('depth', 'width@depth'), ('both', 'width'))

def plans(scored, a) -> dict:
    "`{arm: PruneResult}`: depth and both first, then width at the MACs each of them reached."
    d = prune_model(scored, target_macs=a.depth_target, removes='depth')
    b = prune_model(scored, target_macs=a.target, removes='both')
    at = lambda r: prune_model(scored, target_macs=r.macs_after / r.macs_before)  # noqa: E731
    return {'depth': d, 'width@depth': at(d), 'both': b, 'width': at(b)}

def run(seed:int, a, teacher) -> list:
    "FID of every arm after the same finetune, for one seed; the teacher's FID on the same noise too."
    scored = score_model(teacher, 'digits', calibration_size=a.calibration_size, stride=a.stride, seed=seed,
                         progress=False)
    x = ddim_sample(*teacher, a.samples, 50, seed, progress=False)
    rows = [dict(arm='teacher', seed=seed, fid=fid_score(x, 'digits:all'), macs_fraction=1.)]
    for arm, pr in plans(scored, a).items():
        t0 = time.time()
        ft = finetune((pr.denoiser, pr.scheduler), 'digits', a.finetune_steps, a.batch_size, seed=seed, progress=False)
        x = ddim_sample(ft.denoiser, ft.scheduler, a.samples, 50, seed, progress=False)
        rows.append(dict(arm=arm, seed=seed, fid=fid_score(x, 'digits:all'), params=pr.params_after,
                         macs_fraction=pr.macs_after / pr.macs_before, units_removed=pr.units_removed,
                         seconds=time.time() - t0))
        print(rows[-1], flush=True)
    return rows

def summarise(runs:list) -> list:
    "Mean FID per arm with its interval; each depth arm's paired difference to width at its MACs."
    out, by = [], lambda arm: {r['seed']: r for r in runs if r['arm'] == arm}  # noqa: E731
    for arm in ('teacher', 'depth', 'width@depth', 'both', 'width'):
        rs = list(by(arm).values())
        m, sd, hw = ci95([r['fid'] for r in rs])
        out.append(dict(arm=arm, n=len(rs), fid_mean=m, fid_ci95=hw,
                        macs_fraction=statistics.mean(r['macs_fraction'] for r in rs)))
    for deep, wide in PAIRS:
        a_, b_ = by(deep), by(wide)
        dm, _, dhw = ci95([a_[s]['fid'] - b_[s]['fid'] for s in a_ if s in b_])
        next(r for r in out if r['arm'] == deep).update(minus_width_mean=dm, minus_width_ci95=dhw)
    return out

def _cifar_models(a) -> dict:
    "The CIFAR-10 config (random weights) and its BK-SDM-Small, width and both prunings at the same MACs."
    torch.manual_seed(a.seed)
    tiny = dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=8)
    cfg = CIFAR10_CONFIG if not a.quick else dict(CIFAR10_CONFIG, **tiny)
    teacher = (UNet2DModel(**cfg).eval(), DDPMScheduler())
    mag = ScoredModel(teacher[0], teacher[1], 'magnitude', importance_criterion('magnitude'))
    bk = prune_model(mag, remove_units='bk-sdm-small', layout='diffusers')
    f = bk.macs_after / bk.macs_before
    return {'teacher': teacher, 'bk-sdm-small': (bk.denoiser.eval(), teacher[1]),
            'width': (prune_model(mag, target_macs=f).denoiser.eval(), teacher[1]),
            'both': (prune_model(mag, target_macs=f, removes='both').denoiser.eval(), teacher[1])}

def speed(a, teacher) -> list:
    "Forward ms and paired speedup over each teacher, digits (first seed's arms) and CIFAR-10 config, eager fp32."
    scored = score_model(teacher, 'digits', calibration_size=a.calibration_size, stride=a.stride, seed=a.seed,
                         progress=False)
    digits = {'teacher': teacher, **{k: (r.denoiser.eval(), teacher[1]) for k, r in plans(scored, a).items()}}
    rows = [dict(r, model='digits') for r in speed_rows(digits, a, 'arm')]
    cifar_batches = a.batches
    a.batches = [1, 16] if not a.quick else [1]
    rows += [dict(r, model='cifar10') for r in speed_rows(_cifar_models(a), a, 'arm')]
    a.batches = cifar_batches
    return rows

def sd15(a) -> dict:
    "The SD-1.5-sized UNet on `a.device`: teacher, bk-sdm-small and width at its MACs, fp16, eager and compiled."
    from diffprune.evaluation import latency_runs, paired_speedup
    from diffprune.sizes import count_macs
    torch.manual_seed(a.seed)
    small = dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                 sample_size=16)
    cfg = {**dict(sample_size=64, cross_attention_dim=768), **(small if a.quick else {})}
    teacher = UNet2DConditionModel(**cfg).eval()  # diffusers' defaults are SD 1.x's UNet (860M parameters)
    mag = ScoredModel(teacher, DDPMScheduler(), 'magnitude', importance_criterion('magnitude'))
    bk = prune_model(mag, remove_units='bk-sdm-small', layout='diffusers')
    width = prune_model(mag, target_macs=bk.macs_after / bk.macs_before)
    dtype = torch.float16 if a.device == 'cuda' else torch.float32
    models = {k: (m.to(a.device, dtype), None) for k, m in
              (('teacher', teacher), ('bk-sdm-small', bk.denoiser), ('width', width.denoiser))}
    m0, rows = count_macs(teacher), []
    for compiled in (False, True):
        run_models = {k: ((torch.compile(m) if compiled else m), s) for k, (m, s) in models.items()}
        for batch in a.batches:
            with torch.no_grad(): runs = latency_runs(run_models, batch, a.repeats, warmup=3)
            for k, (m, _) in models.items():
                sp, macs = paired_speedup(runs, 'teacher', k), count_macs(m)
                rows.append(dict(arm=k, compiled=compiled, batch=batch, ms=statistics.median(runs[k]),
                                 speedup=sp['speedup'], macs_reduction=m0 / macs, vs_macs=sp['speedup'] * macs / m0))
                print(rows[-1], flush=True)
    return dict(speed=rows, units_removed=bk.units_removed, dtype=str(dtype))

if __name__ == '__main__':
    p = parser(__doc__.split('\n')[0])
    p.add_argument('--depth-target', type=float, default=0.95)
    p.add_argument('--sd15', action='store_true', help="time the SD-1.5-sized UNet only (a GPU measurement)")
    p.add_argument('--device', default='cpu')
    sd = p.parse_known_args()[0].sd15
    a = seeded_args(p, 'unet_depth_sd15' if sd else 'unet_depth', seeds=3, finetune_steps=500)
    if a.sd15:
        a.batches = [1] if a.quick else [1, 8]
        res = sd15(a)
        print(table(res['speed'], ['arm', 'compiled', 'batch', 'ms', 'speedup', 'macs_reduction', 'vs_macs']))
        write(a.out, a.name + ('' if a.device == 'cpu' else f'_{a.device}'), dict(res, args=vars(a)))
        raise SystemExit(0)
    teacher = load_model('digits')
    runs = seeded_runs(a, lambda seed: run(seed, a, teacher))
    summary = summarise(runs)
    print(table(summary, ['arm', 'n', 'fid_mean', 'fid_ci95', 'minus_width_mean', 'minus_width_ci95', 'macs_fraction']))
    speeds = speed(a, teacher)
    print(table(speeds, ['model', 'arm', 'batch', 'forward_ms', 'speedup', 'macs_reduction', 'vs_macs']))
    lines = []
    for deep, wide in PAIRS:
        s = next(r for r in summary if r['arm'] == deep)
        d, hw = s.get('minus_width_mean'), s.get('minus_width_ci95')
        what = f"{deep} against {wide} at {s['macs_fraction']:.2f} of the MACs: "
        if hw != hw: lines.append(what + f"one seed, no interval ({d:+.1f} FID)")
        elif abs(d) > hw:
            lines.append(what + f"{'width' if d > 0 else deep} is better ({deep} minus {wide} {d:+.1f} FID +/- "
                                f"{hw:.1f}, 95%, {s['n']} seeds)")
        else: lines.append(what + f"no difference shown ({d:+.1f} FID +/- {hw:.1f}, 95%, {s['n']} seeds)")
    for r in speeds:
        if r['arm'] != 'teacher':
            lines.append(f"{r['model']} {r['arm']} at batch {r['batch']}: {r['speedup']:.2f}x faster for "
                         f"{r['macs_reduction']:.2f}x fewer MACs ({r['vs_macs']:.0%} of the MACs ratio)")
    print('\n'.join(lines))
    write(a.out, a.name, dict(summary=summary, runs=runs, speed=speeds, verdicts=lines, args=vars(a)))
    (Path(a.out)/f'{a.name}.partial.json').unlink(missing_ok=True)
