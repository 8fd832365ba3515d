"""Quality per sampling compute: is a pruned model better than simply sampling the teacher with fewer steps?

FID (digits features, 256 samples against all digits) and measured seconds per image for the teacher at 10/20/50/100
DDIM steps and for the Diff-Pruning model (half the MACs, finetuned) at the same steps, one plot. With `--compile`
both UNets run through `torch.compile` (compiled once, before any timing; the compile time is recorded apart), so
the comparison is made at the speed a user can get.

    python bench/quality_vs_compute.py [--finetune-steps 500] [--compile]
"""
import time, torch
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
from pathlib import Path
from common import parser, write, table
from diffprune.models import load_model
from diffprune.diffusion import ddim_sample, compile_denoiser
from diffprune.importance import score_model
from diffprune.prune import prune_model
from diffprune.finetuning import finetune
from diffprune.metrics import fid_score

if __name__ == '__main__':
    p = parser(__doc__.split('\n')[0])
    p.add_argument('--finetune-steps', type=int, default=500)
    p.add_argument('--samples', type=int, default=256)
    p.add_argument('--sample-steps', type=int, nargs='+', default=[10, 20, 50, 100], help="DDIM steps per sample")
    p.add_argument('--compile', action='store_true', help="time the compiled UNets (compile time apart)")
    p.add_argument('--round-to', default='auto', help="prune_model's round_to: 'auto' (the default) or a whole number")
    p.add_argument('--name', default=None, help="results file name (default: quality_vs_compute[_compiled])")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    round_to = a.round_to if a.round_to == 'auto' else int(a.round_to)
    teacher = load_model('digits')
    pr = prune_model(score_model(teacher, 'digits', stride=2, seed=a.seed, progress=False), target_macs=0.5, round_to=round_to)
    ft = finetune((pr.denoiser, pr.scheduler), 'digits', a.finetune_steps, seed=a.seed, progress=False)
    models = {'teacher': teacher, 'pruned (0.5 MACs)': (ft.denoiser, ft.scheduler)}
    compile_s = {}
    if a.compile:  # each UNet compiled once for the batch every sampling run uses (all samples in one pass)
        for name, (u, s) in models.items():
            net, compile_s[name] = compile_denoiser(u.eval(), a.samples)
            models[name] = (net, s)
    rows = []
    for steps in a.sample_steps:
        for name, m in models.items():
            t0 = time.perf_counter()
            x = ddim_sample(*m, a.samples, steps, a.seed, a.samples, progress=False)
            secs = time.perf_counter() - t0
            rows.append(dict(model=name, sample_steps=steps, fid=fid_score(x, 'digits:all'), ms_per_image=1000 * secs / a.samples,
                             compile_s=compile_s.get(name, 0.)))
    print(table(rows, ['model', 'sample_steps', 'fid', 'ms_per_image']))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in models:
        rs = [r for r in rows if r['model'] == name]
        ax.plot([r['ms_per_image'] for r in rs], [r['fid'] for r in rs], 'o-', label=name)
        for r in rs: ax.annotate(str(r['sample_steps']), (r['ms_per_image'], r['fid']), fontsize=7)
    ax.set_xlabel('ms per image (CPU' + (', compiled)' if a.compile else ')'))
    ax.set_ylabel('FID (digits features)')
    ax.set_xscale('log')
    ax.legend()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    name = 'quality_vs_compute' + ('_compiled' if a.compile else '')
    fig.savefig(Path(a.out)/f'{name}.png', dpi=120, bbox_inches='tight')
    write(a.out, name, dict(rows=rows, round_to=pr.round_to, args=vars(a)))
