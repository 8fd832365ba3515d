"""Feature distillation for depth pruning (issue #30): does BK-SDM's feature-level distillation help a UNet that lost
whole blocks, beside output distillation?

The digits teacher, depth-pruned by Diff-Pruning's scores (thr 0.05) to `--depth-target` of its MACs (0.95: both of
its units go, the last level's ResNet pair and the mid-block, leaving 90%), finetuned three ways with the same seed:
- `plain`: the model's own loss;
- `output`: and output distillation from the teacher (alpha 0.5);
- `output+feature`: and feature distillation at the kept blocks' outputs (`alpha_feature`, default 1.0 as BK-SDM).
Then `--samples` DDIM-50 samples from the same noise are scored by FID (digits features, against all digits).
Differences are paired by seed against `output`, with a 95% t-interval.

    python bench/feature_distill.py            # 2 seeds, 500 finetune steps, 512 samples: about 10 minutes on 2 cores
    python bench/feature_distill.py --quick    # seconds: the plumbing, not the result
"""
import time
from common import parser, write, table, ci95, seeded_args, seeded_runs
from diffprune.models import load_model
from diffprune.diffusion import ddim_sample
from diffprune.importance import score_model
from diffprune.prune import prune_model
from diffprune.finetuning import finetune
from diffprune.metrics import fid_score

def run(seed:int, a, teacher) -> list:
    "FID of each arm after the same finetune of the same depth-pruned model, for one seed."
    scored = score_model(teacher, 'digits', calibration_size=a.calibration_size, stride=a.stride, seed=seed,
                         progress=False)
    pr = prune_model(scored, target_macs=a.depth_target, removes='depth')
    rows = []
    for arm, kw in {'plain': {}, 'output': dict(alpha=0.5),
                    'output+feature': dict(alpha=0.5, alpha_feature=a.alpha_feature)}.items():
        t0 = time.time()
        ft = finetune((pr.denoiser, pr.scheduler), 'digits', a.finetune_steps, a.batch_size, seed=seed,
                      teacher=teacher if kw else None, progress=False, **kw)
        x = ddim_sample(ft.denoiser, ft.scheduler, a.samples, 50, seed, progress=False)
        rows.append(dict(arm=arm, seed=seed, fid=fid_score(x, 'digits:all'), units_removed=pr.units_removed,
                         macs_fraction=pr.macs_after / pr.macs_before, seconds=time.time() - t0))
        print(rows[-1], flush=True)
    return rows

def summarise(runs:list) -> list:
    "Mean FID per arm with its interval, and each arm's paired difference to `output`."
    by = lambda arm: {r['seed']: r for r in runs if r['arm'] == arm}  # noqa: E731
    out = []
    for arm in ('plain', 'output', 'output+feature'):
        m, _, hw = ci95([r['fid'] for r in by(arm).values()])
        dm, _, dhw = ci95([by(arm)[s]['fid'] - by('output')[s]['fid'] for s in by(arm)])
        out.append(dict(arm=arm, n=len(by(arm)), fid_mean=m, fid_ci95=hw, minus_output_mean=dm, minus_output_ci95=dhw))
    return out

def main():
    p = parser(__doc__.split('\n')[0])
    p.add_argument('--depth-target', type=float, default=0.95)
    p.add_argument('--alpha-feature', type=float, default=1.0)
    a = seeded_args(p, 'feature_distill', seeds=2, finetune_steps=500)
    teacher = load_model('digits')
    runs = seeded_runs(a, lambda seed: run(seed, a, teacher))
    summary = summarise(runs)
    print(table(summary, ['arm', 'n', 'fid_mean', 'fid_ci95', 'minus_output_mean', 'minus_output_ci95']))
    write(a.out, a.name, dict(settings=vars(a), runs=runs, summary=summary))

if __name__ == '__main__':
    main()
