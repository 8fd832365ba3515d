"""Which layout to prune to: the `diffusers` layout (a plain config) against free-form widths, on the digits teacher.

For each seed, the Diff-Pruning scores (thr 0.05) of the teacher are pruned three ways:
- `diffusers`: the `diffusers` layout at the MACs target (it lands at or below it: a level moves by whole groups);
- `free-form matched`: free-form widths at the MACs the `diffusers` layout reached, so both carry the same compute;
- `free-form`: free-form widths at the MACs target itself, what a user gets by default.
Each is finetuned with the same settings and seed (`--finetune-steps`, EMA), then `--samples` DDIM-50 samples from the
same noise are scored by FID (digits features, against all digits). Differences to `diffusers` are paired by seed,
with a 95% t-interval. Forward speed: the teacher and the three pruned UNets of the first seed, interleaved runs,
eager fp32, at batch 1 and 64; speedup is the median per-run ratio over the teacher (`paired_speedup`).
Runs are appended to a partial file as they finish, so an interrupted run continues where it stopped.

    python bench/layouts.py            # 5 seeds, 500 finetune steps, 512 samples: about 17 minutes on 2 cores
    python bench/layouts.py --quick    # seconds: tiny settings that check the plumbing, not the result
"""
import statistics, time
from pathlib import Path
from common import parser, write, table, ci95, seeded_args, seeded_runs, speed_rows
from diffprune.models import load_model
from diffprune.diffusion import ddim_sample
from diffprune.importance import score_model
from diffprune.prune import prune_model
from diffprune.finetuning import finetune
from diffprune.metrics import fid_score

LAYOUTS = ('diffusers', 'free-form matched', 'free-form')

def pruned(imp, target:float) -> dict:
    "The three pruned results of one set of scores, by name."
    plain = prune_model(imp, target_macs=target, layout='diffusers')
    matched = plain.macs_after / plain.macs_before
    return {'diffusers': plain, 'free-form matched': prune_model(imp, target_macs=matched),
            'free-form': prune_model(imp, target_macs=target)}

def run(seed:int, a, teacher) -> list:
    "FID of each layout after the same finetune, for one seed."
    imp = score_model(teacher, 'digits', calibration_size=a.calibration_size, stride=a.stride, seed=seed, progress=False)
    rows = []
    for name, pr in pruned(imp, a.target).items():
        t0 = time.time()
        ft = finetune((pr.denoiser, pr.scheduler), 'digits', a.finetune_steps, a.batch_size, seed=seed, progress=False)
        x = ddim_sample(ft.denoiser, ft.scheduler, a.samples, 50, seed, progress=False)
        rows.append(dict(layout=name, seed=seed, fid=fid_score(x, 'digits:all'), params=pr.params_after,
                         macs_fraction=pr.macs_after / pr.macs_before, widths=list(pr.denoiser.config.block_out_channels)
                         if name == 'diffusers' else None, time_fit_error=pr.time_fit_error,
                         finetune_final_loss=ft.summary().get('final_loss'), seconds=time.time() - t0))
        print(rows[-1], flush=True)
    return rows

def speed(a, teacher) -> list:
    "Forward ms and paired speedup over the teacher of the three layouts (first seed), eager fp32."
    imp = score_model(teacher, 'digits', calibration_size=a.calibration_size, stride=a.stride, seed=a.seed, progress=False)
    models = {'teacher': teacher, **{k: (r.denoiser.eval(), r.scheduler) for k, r in pruned(imp, a.target).items()}}
    return speed_rows(models, a, 'layout')

def summarise(runs:list) -> list:
    "Mean FID per layout with its interval, and its paired difference to `diffusers` over seeds."
    ref, out = {r['seed']: r['fid'] for r in runs if r['layout'] == 'diffusers'}, []
    for name in LAYOUTS:
        rs = [r for r in runs if r['layout'] == name]
        m, sd, hw = ci95([r['fid'] for r in rs])
        dm, _, dhw = ci95([r['fid'] - ref[r['seed']] for r in rs])
        out.append(dict(layout=name, n=len(rs), fid_mean=m, fid_std=sd, fid_ci95=hw, minus_diffusers_mean=dm,
                        minus_diffusers_ci95=dhw, macs_fraction=statistics.mean(r['macs_fraction'] for r in rs),
                        params=statistics.mean(r['params'] for r in rs)))
    return out

def verdict(summary:list) -> str:
    "Which layout finetunes better, or that the seeds cannot tell them apart."
    s = {r['layout']: r for r in summary}['free-form matched']
    d, hw = s['minus_diffusers_mean'], s['minus_diffusers_ci95']
    if not hw == hw: return 'one seed: no interval'
    if abs(d) <= hw: return (f"no difference shown: free-form minus diffusers at the same MACs is {d:+.1f} FID "
                             f"+/- {hw:.1f} (95%, {s['n']} seeds)")
    better = 'diffusers' if d > 0 else 'free-form'
    return f"{better} layout finetunes better: free-form minus diffusers is {d:+.1f} FID +/- {hw:.1f} (95%, {s['n']} seeds)"

if __name__ == '__main__':
    p = parser(__doc__.split('\n')[0])
    a = seeded_args(p, 'layouts', seeds=5, finetune_steps=500)
    teacher = load_model('digits')
    runs = seeded_runs(a, lambda seed: run(seed, a, teacher))
    summary = summarise(runs)
    print(table(summary, ['layout', 'n', 'fid_mean', 'fid_ci95', 'minus_diffusers_mean', 'minus_diffusers_ci95',
                          'macs_fraction', 'params']))
    speeds = speed(a, teacher)
    print(table(speeds, ['layout', 'batch', 'forward_ms', 'speedup', 'macs_reduction', 'vs_macs']))
    print(verdict(summary))
    write(a.out, a.name, dict(summary=summary, runs=runs, speed=speeds, verdict=verdict(summary), args=vars(a)))
    (Path(a.out)/f'{a.name}.partial.json').unlink(missing_ok=True)
