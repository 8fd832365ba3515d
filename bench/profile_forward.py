"""Where the time of a forward goes: the digits teacher against copies pruned to several MACs targets, per kind of op.

The speedup benchmark measures the pruned digits UNets at well under their MACs reduction on a CPU. This script asks
torch's profiler which ops take the time, grouped into convolutions, linear layers, attention (the matmuls and
softmax), GroupNorm, element-wise ops (SiLU, adds, scaling, copies) and the rest, and how much each group shrinks
with the MACs. Ops whose time does not shrink with the channel count explain the gap. Each target is also profiled
pruned with `round_to=16` (every pruned width a multiple of 16).

    python bench/profile_forward.py [--device cuda]
"""
import torch
from torch.profiler import profile, ProfilerActivity
from common import parser, write, table, pruned_digits
from diffprune.sizes import count_macs
from diffprune.diffusion import sample_shape

KINDS = [  # (kind, substrings of aten op names), first match wins
    ('conv', ('conv', 'mkldnn_convolution')), ('attention', ('scaled_dot_product', 'softmax', 'bmm', 'baddbmm')),
    ('linear', ('addmm', 'linear', 'aten::mm', 'aten::matmul')), ('groupnorm', ('group_norm',)),
    ('elementwise', ('silu', 'add', 'mul', 'div', 'sub', 'copy_', 'clone', 'contiguous', 'cat', 'sin', 'cos', 'exp',
                     'upsample', 'avg_pool', 'to', 'fill_', 'empty')),
]

def kind(name:str) -> str:
    return next((k for k, keys in KINDS if any(s in name for s in keys)), 'other')

@torch.no_grad()
def profile_forward(unet, batch:int, repeats:int, device:str, seed:int=0) -> dict:
    "Milliseconds per forward spent in each kind of op (self time of the leaf ops), and the op count per forward."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *sample_shape(unet), generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    for _ in range(2): unet(x, t)  # warm-up: kernel choice, allocator
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith('cuda') else [])
    with profile(activities=acts) as prof:
        for _ in range(repeats): unet(x, t)
    ms, ops = {k: 0. for k, _ in KINDS + [('other', ())]}, 0
    for e in prof.key_averages():
        if not e.key.startswith('aten::'): continue
        us = e.self_device_time_total if device.startswith('cuda') else e.self_cpu_time_total
        ms[kind(e.key)] += us / 1000 / repeats
        ops += e.count
    return dict(ms, total=sum(ms.values()), ops_per_forward=ops / repeats)

if __name__ == '__main__':
    p = parser(__doc__.split('\n')[0])
    p.add_argument('--targets', type=float, nargs='+', default=[0.75, 0.5, 0.25])
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--device', default='cpu')
    p.add_argument('--round-to', type=int, nargs='*', default=[16], help="also profile each target pruned with widths rounded to these multiples")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    models = {k: u.eval() for k, (u, _) in pruned_digits(a.targets, a.round_to, a.device, a.seed).items()}
    teacher = models['teacher']
    prof = {k: profile_forward(u, a.batch, a.repeats, a.device, a.seed) for k, u in models.items()}
    m0, rows = count_macs(teacher), []
    for k, u in models.items():
        r = prof[k]
        mr = m0 / count_macs(u)
        rows.append(dict(model=k, macs_reduction=mr, **{c: r[c] for c in r}, speedup=prof['teacher']['total'] / r['total'],
                         **{f'{c}_speedup': prof['teacher'][c] / r[c] for c in ('conv', 'linear', 'attention', 'groupnorm', 'elementwise') if r[c] > 0}))
    cols = ['model', 'macs_reduction', 'total', 'speedup', 'conv', 'conv_speedup', 'linear', 'attention', 'groupnorm', 'elementwise',
            'elementwise_speedup', 'other', 'ops_per_forward']
    print(table(rows, cols))
    write(a.out, f'profile_forward_{a.device}', dict(rows=rows, args=vars(a)))
