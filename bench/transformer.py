"""Diff-Pruning on a diffusion transformer: a shipped digits transformer at half the MACs, by method and by what goes.

`--model digits-dit` (the default): the DiT, 8 blocks of 4 heads and 256 MLP units, trained 12,000 steps (DDPM).
`--model digits-mmdit`: the class-conditioned MMDiT in SD3.5 Medium's block layout, 6 joint blocks (4 heads in
each of two attentions in the first two, one in the rest; 256 units in each of the image and text stream's MLPs),
trained 8,000 steps with flow matching; its samples are Euler's, its finetune draws logit-normal timesteps.

For each seed the teacher is scored on 32 labelled digits (every 5th timestep; Diff-Pruning keeps [0, T'] at thr
0.05, the Taylor baseline all timesteps) and pruned to `--target` of the MACs:
- methods, pruning width (heads and MLP units): Diff-Pruning, Taylor over all timesteps, magnitude, random;
- what goes, scored by Diff-Pruning: width, depth (whole blocks), both.
Each is finetuned with the same settings and seed (`--finetune-steps` at batch 64; the defaults are 10% of the
teacher's training, EMA), then `--samples` DDIM-50 samples (Euler-50 for flow) from the same noise, every class in
turn, are scored by FID (digits features, against all digits). Differences to Diff-Pruning width are paired by
seed, with a 95% t-interval. Forward speed: the teacher and the three Diff-Pruning models of the first seed,
interleaved runs, eager fp32, at batch 1 and 64; speedup is the median per-run ratio over the teacher
(`paired_speedup`), set against the MACs reduction. Runs are appended to a partial file as they finish, so an
interrupted run continues where it stopped.

    python bench/transformer.py            # 3 seeds, 1,200 finetune steps, 512 samples: about 30 minutes on 2 cores
    python bench/transformer.py --model digits-mmdit   # 800 finetune steps (10%): about 45 minutes on 2 cores
    python bench/transformer.py --quick    # seconds: tiny settings that check the plumbing, not the result
"""
import statistics, time
from pathlib import Path
from common import parser, write, table, ci95, seeded_args, seeded_runs, speed_rows
from diffprune.models import load_model
from diffprune.diffusion import ddim_sample
from diffprune.importance import score_model
from diffprune.prune import prune_model
from diffprune.sizes import count_params
from diffprune.finetuning import finetune
from diffprune.metrics import fid_score

METHODS = ('diff-pruning', 'taylor', 'magnitude', 'random')
KINDS = ('width', 'depth', 'both')
REF = ('diff-pruning', 'width')

def arms() -> list:
    "`(method, what goes)` of every model a seed finetunes: the methods by width, then Diff-Pruning's depth and both."
    return [(m, 'width') for m in METHODS] + [('diff-pruning', k) for k in KINDS[1:]]

def scores(a, teacher, seed:int) -> dict:
    "The scored teacher of each method, on the seed's calibration batch."
    kw = dict(calibration_size=a.calibration_size, stride=a.stride, seed=seed, progress=False)
    return {m: score_model(teacher, 'digits', m, **kw) for m in METHODS}  # taylor: every timestep

def run(seed:int, a, teacher) -> list:
    "FID of every arm after the same finetune, for one seed; the teacher's FID on the same noise too."
    scored, rows = scores(a, teacher, seed), []
    x = ddim_sample(*teacher, a.samples, 50, seed, progress=False)
    rows.append(dict(method='teacher', prune=None, seed=seed, fid=fid_score(x, 'digits:all'), macs_fraction=1.,
                     params=count_params(teacher[0])))
    for method, kind in arms():
        t0 = time.time()
        pr = prune_model(scored[method], target_macs=a.target, removes=kind)
        ft = finetune((pr.denoiser, pr.scheduler), 'digits', a.finetune_steps, a.batch_size, seed=seed, progress=False)
        x = ddim_sample(ft.denoiser, ft.scheduler, a.samples, 50, seed, progress=False)
        rows.append(dict(method=method, prune=kind, seed=seed, fid=fid_score(x, 'digits:all'), params=pr.params_after,
                         macs_fraction=pr.macs_after / pr.macs_before, blocks_kept=pr.blocks_kept,
                         t_prime=scored[method].analysis.t_prime if scored[method].analysis else None,
                         finetune_final_loss=ft.summary().get('final_loss'), seconds=time.time() - t0))
        print(rows[-1], flush=True)
    return rows

def speed(a, teacher) -> list:
    "Forward ms and paired speedup over the teacher of width, depth and both (Diff-Pruning, first seed), eager fp32."
    imp = score_model(teacher, 'digits', calibration_size=a.calibration_size, stride=a.stride, seed=a.seed,
                      progress=False)
    models = {'teacher': teacher}
    for k in KINDS: models[k] = (prune_model(imp, target_macs=a.target, removes=k).denoiser.eval(), teacher[1])
    return speed_rows(models, a, 'prune')

def summarise(runs:list) -> list:
    "Mean FID per arm with its interval, and its paired difference to Diff-Pruning width over seeds."
    ref = {r['seed']: r['fid'] for r in runs if (r['method'], r['prune']) == REF}
    out = []
    for method, kind in [('teacher', None), *arms()]:
        rs = [r for r in runs if (r['method'], r['prune']) == (method, kind)]
        m, sd, hw = ci95([r['fid'] for r in rs])
        dm, _, dhw = ci95([r['fid'] - ref[r['seed']] for r in rs])
        out.append(dict(method=method, prune=kind, n=len(rs), fid_mean=m, fid_std=sd, fid_ci95=hw,
                        minus_ref_mean=dm, minus_ref_ci95=dhw,
                        macs_fraction=statistics.mean(r['macs_fraction'] for r in rs),
                        params=statistics.mean(r['params'] for r in rs)))
    return out

def _compare(s:dict, what:str) -> str:
    d, hw, n = s['minus_ref_mean'], s['minus_ref_ci95'], s['n']
    if not hw == hw: return f"{what}: one seed, no interval"
    if abs(d) <= hw: return f"{what}: no difference shown ({d:+.1f} FID +/- {hw:.1f}, 95%, {n} seeds)"
    return (f"{what}: Diff-Pruning width is {'better' if d > 0 else 'worse'} "
            f"(other minus it {d:+.1f} FID +/- {hw:.1f}, 95%, {n} seeds)")

def verdicts(summary:list, speeds:list) -> list:
    "One line per comparison: each baseline and each other kind against Diff-Pruning width; speed against MACs."
    by = {(r['method'], r['prune']): r for r in summary}
    out = [_compare(by[(m, 'width')], f'{m} (width) against Diff-Pruning (width)') for m in METHODS[1:]]
    out += [_compare(by[('diff-pruning', k)], f'Diff-Pruning {k} against width') for k in KINDS[1:]]
    for r in speeds:
        if r['prune'] == 'teacher': continue
        out.append(f"{r['prune']} at batch {r['batch']}: {r['speedup']:.2f}x faster for {r['macs_reduction']:.2f}x "
                   f"fewer MACs ({r['vs_macs']:.0%} of the MACs ratio)")
    return out

if __name__ == '__main__':
    p = parser(__doc__.split('\n')[0])
    p.add_argument('--model', default='digits-dit', choices=('digits-dit', 'digits-mmdit'), help="the teacher")
    mmdit = p.parse_known_args()[0].model == 'digits-mmdit'
    a = seeded_args(p, 'transformer_mmdit' if mmdit else 'transformer', seeds=3,
                    finetune_steps=800 if mmdit else 1200)
    teacher = load_model(a.model)
    runs = seeded_runs(a, lambda seed: run(seed, a, teacher))
    summary = summarise(runs)
    print(table(summary, ['method', 'prune', 'n', 'fid_mean', 'fid_ci95', 'minus_ref_mean', 'minus_ref_ci95',
                          'macs_fraction', 'params']))
    speeds = speed(a, teacher)
    print(table(speeds, ['prune', 'batch', 'forward_ms', 'speedup', 'macs_reduction', 'vs_macs']))
    lines = verdicts(summary, speeds)
    print('\n'.join(lines))
    write(a.out, a.name, dict(summary=summary, runs=runs, speed=speeds, verdicts=lines, args=vars(a)))
    (Path(a.out)/f'{a.name}.partial.json').unlink(missing_ok=True)
