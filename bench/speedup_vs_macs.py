"""Speedup against MACs: the digits teacher and copies pruned (Diff-Pruning) to several MACs targets.

Throughput of a UNet forward and of DDIM sampling at batch 64, teacher and pruned models interleaved, medians; the
measured speedup is printed next to the MACs reduction (teacher MACs / pruned MACs). Target: speedup >= 0.9 x MACs reduction.
Each target is also pruned with `round_to=16`, every pruned width a multiple of 16: CPU convolution kernels work in
blocks of 16 channels on AVX-512, and `bench/profile_forward.py` found the convolutions of the plain pruned models
slow for their MACs.

    python bench/speedup_vs_macs.py [--device cuda]
"""
import torch
from common import parser, write, table, pruned_digits
from diffprune.prune import count_macs, count_params
from diffprune.evaluation import latency

if __name__ == '__main__':
    p = parser(__doc__.split('\n')[0])
    p.add_argument('--targets', type=float, nargs='+', default=[0.75, 0.5, 0.35, 0.25])
    p.add_argument('--batch', type=int, default=64); p.add_argument('--repeats', type=int, default=21)
    p.add_argument('--sampling-steps', type=int, default=10); p.add_argument('--device', default='cpu')
    p.add_argument('--round-to', type=int, nargs='*', default=[16], help="also prune each target with widths rounded to these multiples")
    a = p.parse_args(); torch.manual_seed(a.seed)
    models = pruned_digits(a.targets, a.round_to, a.device, a.seed); teacher = models['teacher']
    fwd = latency(models, a.batch, a.repeats)
    smp = latency(models, a.batch, max(3, a.repeats // 3), warmup=1, sampling_steps=a.sampling_steps)
    m0 = count_macs(teacher[0]); rows = []
    for k, (u, s) in models.items():
        mr = m0 / count_macs(u)
        rows.append(dict(model=k, params=count_params(u), macs=count_macs(u), macs_reduction=mr, attn_share=(count_macs(u, True) - count_macs(u)) / count_macs(u, True),
                         forward_ms=fwd[k], forward_speedup=fwd['teacher'] / fwd[k], sampling_ms=smp[k], sampling_speedup=smp['teacher'] / smp[k],
                         forward_vs_macs=fwd['teacher'] / fwd[k] / mr, sampling_vs_macs=smp['teacher'] / smp[k] / mr))
    print(table(rows, ['model', 'params', 'macs_reduction', 'attn_share', 'forward_ms', 'forward_speedup', 'forward_vs_macs', 'sampling_speedup', 'sampling_vs_macs']))
    write(a.out, f'speedup_vs_macs_{a.device}', dict(rows=rows, args=vars(a)))
