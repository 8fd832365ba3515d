"""The paper's comparison on digits: every method pruned to the same MACs, finetuned with the same budget, several seeds.

Rows: Pretrained (the teacher), Scratch (random pruning, weights re-initialised), Random, Magnitude, Taylor (all
timesteps), Diff-Pruning with thr 0 / 0.02 / 0.05, and Diff-Pruning (thr 0.05) + distillation. Each row is run for
every seed (the seed sets the calibration batch and noise, random scores, finetune batches and the sample noise);
FID (digits features, 256 DDIM-50 samples against all digits) is reported as mean, std and a 95% t-interval, and each
method is compared with Diff-Pruning (thr 0.05) by the paired difference over seeds. Results are appended to the JSON
as runs finish, so an interrupted run continues where it stopped.

    python bench/paper_table.py                      # 5 seeds, 100 finetune steps, half the MACs, 32 calibration images: about 35 min on 2 cores
    python bench/paper_table.py --seeds 10 --steps 1000   # larger settings
    # the paper's budget, 600 steps (10% of the teacher's 6000), as committed in results/paper_table_600.json:
    python bench/paper_table.py --steps 600 --samples 512 --seeds 3 --rows 'Diff-Pruning thr=0.05 + distill' --name paper_table_600
"""
import json, time, statistics
from pathlib import Path
import torch
from common import parser, write, table, ci95
from diffprune.models import load_model
from diffprune.diffusion import ddim_sample
from diffprune.importance import score_model
from diffprune.prune import prune_model
from diffprune.finetuning import finetune
from diffprune.metrics import fid_score
from diffprune.evaluation import consistency

ROWS = {  # name: (method, threshold, alpha, reinit, stride)
    'Scratch': ('random', 0., 0., True, 1), 'Random': ('random', 0., 0., False, 1), 'Magnitude': ('magnitude', 0., 0., False, 1),
    'Taylor (all t)': ('taylor', 0., 0., False, 10), 'Diff-Pruning thr=0': ('diff-pruning', 0., 0., False, 10),
    'Diff-Pruning thr=0.02': ('diff-pruning', 0.02, 0., False, 5), 'Diff-Pruning thr=0.05': ('diff-pruning', 0.05, 0., False, 5),
    'Diff-Pruning thr=0.05 + distill': ('diff-pruning', 0.05, 0.5, False, 5),
}

def run(name, seed, a, teacher, real_samples):
    method, thr, alpha, reinit, stride = ROWS[name]
    t0 = time.time()
    imp = score_model(teacher, 'digits', method, thr, calibration_size=a.calib, stride=stride, seed=seed, progress=False)
    pr = prune_model(imp, target_macs=a.target)
    if reinit:
        torch.manual_seed(seed)
        for m in pr.denoiser.modules():
            if hasattr(m, 'reset_parameters') and m is not pr.denoiser: m.reset_parameters()
    ft = finetune((pr.denoiser, pr.scheduler), 'digits', a.steps, 64, a.lr, teacher=teacher if alpha else None, alpha=alpha, seed=seed, progress=False)
    x = ddim_sample(ft.denoiser, ft.scheduler, a.samples, 50, seed, progress=False)
    return dict(row=name, seed=seed, fid=fid_score(x, 'digits:all'), ssim=consistency(real_samples, x)['ssim'],
                params=pr.params_after, macs=pr.macs_after, macs_fraction=pr.macs_after / pr.macs_before,
                t_prime=imp.analysis.t_prime if imp.analysis else None, kept=len(imp.analysis.kept_timesteps) if imp.analysis else None,
                steps=a.steps, seconds=time.time() - t0)

if __name__ == '__main__':
    p = parser(__doc__.split('\n')[0])
    p.add_argument('--seeds', type=int, default=5)
    p.add_argument('--steps', type=int, default=100)
    p.add_argument('--target', type=float, default=0.5)
    p.add_argument('--lr', type=float, default=2e-4)
    p.add_argument('--calib', type=int, default=32)
    p.add_argument('--samples', type=int, default=256)
    p.add_argument('--rows', nargs='+', default=list(ROWS), choices=list(ROWS), metavar='ROW')
    p.add_argument('--name', default='paper_table', help="result file name, so that other settings keep their own results")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out/f'{a.name}.partial.json'
    runs = json.loads(partial.read_text()) if partial.exists() else []
    done = {(r['row'], r['seed']) for r in runs}
    teacher = load_model('digits')
    for seed in range(a.seed, a.seed + a.seeds):
        tx = ddim_sample(*teacher, a.samples, 50, seed, progress=False)
        if ('Pretrained', seed) not in done:
            runs.append(dict(row='Pretrained', seed=seed, fid=fid_score(tx, 'digits:all'), ssim=1.0, params=sum(p.numel() for p in teacher[0].parameters()),
                             macs=None, macs_fraction=1.0, steps=0))
        for name in a.rows:
            if (name, seed) in done: continue
            runs.append(run(name, seed, a, teacher, tx))
            print(runs[-1], flush=True)
            partial.write_text(json.dumps(runs))
    summary, ref = [], {r['seed']: r['fid'] for r in runs if r['row'] == 'Diff-Pruning thr=0.05'}
    for name in ['Pretrained', *a.rows]:
        rs = [r for r in runs if r['row'] == name]
        m, sd, hw = ci95([r['fid'] for r in rs])
        diffs = [r['fid'] - ref[r['seed']] for r in rs if r['seed'] in ref]
        dm, _, dhw = ci95(diffs) if diffs else (float('nan'), 0, float('nan'))
        summary.append(dict(row=name, n=len(rs), fid_mean=m, fid_std=sd, fid_ci95=hw, vs_dp05_mean=dm, vs_dp05_ci95=dhw,
                            ssim=statistics.mean(r['ssim'] for r in rs), params=rs[0]['params'], macs_fraction=statistics.mean(r['macs_fraction'] for r in rs),
                            t_prime=rs[0].get('t_prime'), kept=rs[0].get('kept'), steps=rs[0]['steps']))
    print(table(summary, ['row', 'n', 'fid_mean', 'fid_std', 'fid_ci95', 'vs_dp05_mean', 'vs_dp05_ci95', 'ssim', 'params', 'macs_fraction', 't_prime', 'kept']))
    write(a.out, a.name, dict(summary=summary, runs=runs, args=vars(a)))
    partial.unlink(missing_ok=True)
