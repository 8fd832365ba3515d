"""Speedup against MACs: teachers and their pruned copies, eager and compiled, forward and DDIM sampling, side by side.

Models (`--families`): the shipped digits teacher, pruned by Diff-Pruning, and the CIFAR-10 config of
google/ddpm-cifar10-32 (35.7M params; random weights suffice for speed), pruned by magnitude. Each is pruned to every
MACs target (`--targets`), plainly and with each `--round-to` (every pruned width a multiple of it).

Each configuration `DTYPE:MODE:BATCH` (`--configs`; MODE is `eager` or a `torch.compile` mode, `default` being
torch.compile's own) times every model of a family at that batch: a forward pass, and DDIM sampling of
`--sampling-steps` steps. The models' runs are interleaved (teacher, pruned, teacher, ...), so that load on the
machine slows all of them; speedup is the median of the per-run teacher / pruned ratios, and `vs_macs` is that
speedup over the MACs reduction. A compiled model is compiled before it is timed (`compile_s`, not in any time).
The JSON is rewritten after each configuration, so a run stopped at a time limit keeps what it measured.

Target (issue #18): vs_macs >= 0.9 at the large batch, compiled, on both models; eager too on the CIFAR-10 config.

    python bench/speedup_vs_macs.py                  # two CPU cores: about 40 minutes
    python bench/speedup_vs_macs.py --device cuda --configs fp32:eager:128 bf16:reduce-overhead:128 ...  (bench/gpu.sh)
    python bench/speedup_vs_macs.py --quick          # seconds: the same code on a tiny UNet (compiled rows use the
                                                     # 'eager' backend: they check the plumbing, not the speed)
"""
import time, torch
from common import parser, write, table, paired
from diffprune.models import load_model, tiny_unet, CIFAR10_CONFIG
from diffprune.importance import score_model
from diffprune.prune import prune_model
from diffprune.sizes import count_macs, count_params
from diffprune.evaluation import latency_runs
from diffprune.diffusion import compile_denoiser

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
LARGE = {'cpu': {'digits': 64, 'cifar10': 32, 'tiny': 4}, 'cuda': {'digits': 512, 'cifar10': 128, 'tiny': 4}}

def teacher(family:str, device:str, seed:int) -> tuple:
    "`(unet, scheduler, method)`: the family's teacher and the method its copies are pruned by."
    from diffusers import UNet2DModel, DDPMScheduler
    torch.manual_seed(seed)
    if family == 'digits': return (*load_model('digits'), 'diff-pruning')
    if family == 'cifar10': return UNet2DModel(**CIFAR10_CONFIG), DDPMScheduler(num_train_timesteps=1000), 'magnitude'
    if family == 'tiny': return tiny_unet(seed=seed), DDPMScheduler(num_train_timesteps=1000), 'magnitude'
    raise SystemExit(f"unknown family {family!r}: use digits, cifar10 or tiny")

def pruned_family(family:str, targets, round_to, device:str, seed:int) -> dict:
    "`{name: (unet, scheduler)}`: the teacher and its copies pruned to each MACs target, plain and with each round_to."
    u, s, method = teacher(family, device, seed)
    scored = score_model((u, s), method=method, stride=5, calibration_size=32, seed=seed, device=device,
                         progress=False)
    models = {'teacher': (u.eval(), s)}
    for t in targets:
        for n in (None, *round_to):
            r = prune_model(scored, target_macs=t, round_to=n)
            models[f'{t:.2f}' + (f' round_to={n}' if n else '')] = (r.denoiser.eval(), r.scheduler)
    return {k: (m.to(device), sch) for k, (m, sch) in models.items()}

def timed(models:dict, dtype, mode:str, batch:int, a) -> list:
    "Rows for one configuration: every model's forward and sampling ms, paired speedups against the teacher."
    nets, compile_s = {}, {}
    for k, (u, s) in models.items():
        net = u.to(DTYPES[dtype])
        if mode != 'eager':
            backend = 'eager' if a.quick else 'inductor'
            net, compile_s[k] = compile_denoiser(net, batch, mode=None if mode == 'default' else mode, backend=backend)
            if net is u: raise SystemExit(f"{k}: torch.compile failed for {dtype}:{mode}:{batch} (see above)")
        nets[k] = (net, s)
    fwd = latency_runs(nets, batch, a.repeats, warmup=2)
    smp = latency_runs(nets, batch, max(2, a.repeats // 3), warmup=1, sampling_steps=a.sampling_steps)
    for u, _ in models.values(): u.float()
    m0 = count_macs(models['teacher'][0])
    rows = []
    for k, (u, _) in models.items():
        mr = m0 / count_macs(u)
        f, sp = paired(fwd, 'teacher', k), paired(smp, 'teacher', k)
        rows.append(dict(model=k, dtype=dtype, mode=mode, batch=batch, params=count_params(u), macs_reduction=mr,
                         forward_ms=f['ms'], forward_speedup=f['speedup'], forward_vs_macs=f['speedup'] / mr,
                         sampling_ms=sp['ms'], sampling_speedup=sp['speedup'], sampling_vs_macs=sp['speedup'] / mr,
                         compile_s=compile_s.get(k, 0.)))
    return rows

def verdicts(rows:list, large:dict) -> list:
    "Issue #18's target per family, dtype and mode at the large batch: is every pruned model's vs_macs >= 0.9?"
    out = []
    keys = sorted({(r['family'], r['dtype'], r['mode']) for r in rows if r['batch'] == large[r['family']]})
    for fam, dt, mode in keys:
        pr = [r for r in rows if (r['family'], r['dtype'], r['mode'], r['batch']) == (fam, dt, mode, large[fam])
              and r['model'] != 'teacher']
        if not pr: continue
        worst = min(pr, key=lambda r: r['forward_vs_macs'])
        out.append(dict(family=fam, dtype=dt, mode=mode, batch=large[fam], min_forward_vs_macs=worst['forward_vs_macs'],
                        worst_model=worst['model'], met=worst['forward_vs_macs'] >= 0.9,
                        min_sampling_vs_macs=min(r['sampling_vs_macs'] for r in pr)))
    return out

if __name__ == '__main__':
    p = parser(__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--families', nargs='+', default=['digits', 'cifar10'])
    p.add_argument('--targets', type=float, nargs='+', default=[0.75, 0.5, 0.35])
    p.add_argument('--round-to', type=int, nargs='*', default=None,
                   help="also prune each target to widths that are multiples of these (default: 16 on a CPU, 8 on CUDA)")
    p.add_argument('--configs', nargs='+', default=None, metavar='DTYPE:MODE:BATCH',
                   help="default: fp32, eager and compiled, at batch 1 and the family's large batch ('L')")
    p.add_argument('--repeats', type=int, default=9)
    p.add_argument('--sampling-steps', type=int, default=10)
    p.add_argument('--quick', action='store_true', help="a tiny UNet, one target, a few repeats: checks the script runs")
    p.add_argument('--name', default='speedup_vs_macs', help="results file name (the device is appended)")
    a = p.parse_args()
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()  # .to(dtype) warns on every model, though these UNets keep nothing in fp32
    torch._dynamo.config.recompile_limit = 1024  # one compiled graph per model and shape, all kept
    torch._dynamo.config.accumulated_recompile_limit = 4096
    kind = torch.device(a.device).type
    if a.round_to is None: a.round_to = [16] if kind == 'cpu' else [8]
    if a.configs is None: a.configs = ['fp32:eager:1', 'fp32:eager:L', 'fp32:default:L', 'fp32:default:1']
    if a.quick: a.families, a.targets, a.repeats, a.sampling_steps = ['tiny'], [0.5], 3, 2
    large = {f: 2 if a.quick else LARGE[kind][f] for f in a.families}
    name = f'{a.name}_{kind}' + ('_quick' if a.quick else '')
    rows, t0 = [], time.time()
    for fam in a.families:
        models = pruned_family(fam, a.targets, a.round_to, a.device, a.seed)
        for c in a.configs:
            dtype, mode, b = c.split(':')
            batch = large[fam] if b == 'L' else int(b)
            new = [dict(family=fam, **r) for r in timed(models, dtype, mode, batch, a)]
            rows += new
            print(table(new, ['family', 'model', 'dtype', 'mode', 'batch', 'macs_reduction', 'forward_ms',
                              'forward_vs_macs', 'sampling_vs_macs', 'compile_s']), flush=True)
            write(a.out, name, dict(rows=rows, verdicts=verdicts(rows, large), large_batch=large, args=vars(a),
                                    seconds=time.time() - t0))
    print(table(verdicts(rows, large), ['family', 'dtype', 'mode', 'batch', 'min_forward_vs_macs', 'worst_model', 'met']))
