"""Speed against MACs of a FLUX.1-dev-wide transformer with few blocks, pruned by width and by depth (issue #29).

FLUX.1-dev's width (24 heads of 128, `joint_attention_dim` 4096, guidance embedding) with 2 double and 4 single
blocks in place of 19 and 38, random weights, 1024 px (64 x 64 = 4096 image tokens, 512 text tokens): the teacher,
width pruning to half the MACs and depth pruning to half the MACs (magnitude scores: speed does not depend on which
units go). Forward ms of each, interleaved runs (`paired_speedup`), bf16 on a GPU (fp32 on a CPU), eager and
compiled, batch 1; speedup set against the MACs reduction. bench/gpu.sh runs it on a GPU; no GPU was lent to the
sessions that wrote it, so its results are not in 11_benchmarks yet.

    python bench/flux_speed.py --device cuda    # the measurement (bench/gpu.sh)
    python bench/flux_speed.py --quick          # seconds on a CPU: a tiny Flux, the plumbing only
"""
import statistics
import torch
from common import parser, write, table
from diffusers import FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffprune.importance import ScoredModel, importance_criterion
from diffprune.prune import prune_model
from diffprune.evaluation import latency_runs, paired_speedup
from diffprune.sizes import count_macs

def flux_config(quick:bool) -> dict:
    "FLUX.1-dev's widths with 2 + 4 blocks, or (quick) a tiny Flux."
    if quick: return dict(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                          num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                          guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))

def models(a) -> dict:
    "`{name: (model, None)}`: the teacher and its width- and depth-pruned copies at `a.target` of the MACs."
    torch.manual_seed(a.seed)
    with torch.device(a.device): teacher = FluxTransformer2DModel(**flux_config(a.quick)).eval()
    teacher.register_to_config(sample_size=8 if a.quick else 128)  # latent side: 1024 px for FLUX.1's VAE
    scored = ScoredModel(teacher, FlowMatchEulerDiscreteScheduler(), 'magnitude', importance_criterion('magnitude'))
    out = {'teacher': teacher}
    for kind in ('width', 'depth'):
        out[kind] = prune_model(scored, target_macs=a.target, removes=kind).denoiser.eval()
    dtype = torch.bfloat16 if a.device == 'cuda' else torch.float32
    return {k: (m.to(dtype), None) for k, m in out.items()}

def speed(a) -> list:
    "Forward ms, paired speedup over the teacher and its share of the MACs ratio, eager and compiled."
    eager, rows = models(a), []
    m0 = count_macs(eager['teacher'][0])
    for compiled in ([False, True] if a.device == 'cuda' else [False]):
        run = {k: ((torch.compile(m) if compiled else m), s) for k, (m, s) in eager.items()}
        with torch.no_grad(): runs = latency_runs(run, 1, a.repeats, warmup=3)
        for k, (m, _) in eager.items():
            sp, macs = paired_speedup(runs, 'teacher', k), count_macs(m)
            rows.append(dict(prune=k, compiled=compiled, ms=statistics.median(runs[k]), speedup=sp['speedup'],
                             macs_reduction=m0 / macs, vs_macs=sp['speedup'] * macs / m0))
            print(rows[-1], flush=True)
    return rows

if __name__ == '__main__':
    p = parser(__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--target', type=float, default=0.5)
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--quick', action='store_true')
    a = p.parse_args()
    if a.quick: a.repeats = 2
    rows = speed(a)
    print(table(rows, ['prune', 'compiled', 'ms', 'speedup', 'macs_reduction', 'vs_macs']))
    name = 'flux_speed' + ('_quick' if a.quick else '') + ('' if a.device == 'cpu' else f'_{a.device}')
    write(a.out, name, dict(rows=rows, args=vars(a)))
