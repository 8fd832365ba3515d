"""Peak memory of scoring (exact and fast mode), finetuning and sampling on the CIFAR-10 config of google/ddpm-cifar10-32.

Every phase runs in a process of its own, so that one phase's peak is not another's: on a CPU the peak resident set
(`ru_maxrss`), on CUDA `torch.cuda.max_memory_allocated`. `above_model` is the peak less the same process's memory
once the model is loaded, i.e. what the phase itself needs. Scoring stacks `images_per_pass` images (timesteps x
calibration batch) into each forward and backward pass, so its memory grows with that number; the slope per image,
fitted over the pass sizes measured, says which pass size fits a given memory (printed at the end).

Phases: exact mode (`taylor_gradients`, the one sweep, here stopped after two passes: a pass's memory does not
depend on how many follow); fast mode (the strided analysis without gradients, then the gradients of 16 stratified
timesteps); a finetune of a few steps (Adam, EMA); DDIM sampling.

    python bench/memory.py                 # CPU: about 3 minutes on two cores
    python bench/memory.py --device cuda   # bench/gpu.sh
    python bench/memory.py --quick         # a tiny UNet, seconds
"""
import argparse, json, os, resource, subprocess, sys, time
import torch
from common import parser, write, table

def peak_mib(device) -> float:
    if torch.device(device).type == 'cuda': return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

def now_mib(device) -> float:
    if torch.device(device).type == 'cuda': return torch.cuda.memory_allocated() / 2**20
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20

def model(quick:bool, device):
    from diffusers import UNet2DModel, DDPMScheduler
    from diffprune.models import tiny_unet, CIFAR10_CONFIG
    torch.manual_seed(0)
    u = tiny_unet() if quick else UNet2DModel(**CIFAR10_CONFIG)
    return u.to(device), DDPMScheduler(num_train_timesteps=1000)

class Images(torch.utils.data.Dataset):
    "A dataset of the images of a tensor in [-1, 1], as `finetune` takes."
    def __init__(self, x:torch.Tensor): self.x = x
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i]

def phase(name:str, arg:int, quick:bool, device) -> dict:
    "Run one phase in this process; its peak and what it needs above the loaded model."
    from diffprune.importance import taylor_gradients, accumulate_gradients, stratified_timesteps
    from diffprune.timesteps import analyze_timesteps
    from diffprune.finetuning import finetune
    from diffprune.diffusion import ddim_sample, sample_shape
    u, s = model(quick, device)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(arg if name == 'finetune' else 4, *sample_shape(u), generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = now_mib(device)
    t0 = time.perf_counter()
    if name == 'score exact':  # two passes of `arg` images: 4 calibration images x arg/4 timesteps each
        taylor_gradients(u, s, x0, noise, 0.05, range(2 * max(1, arg // len(x0))), images_per_pass=arg, progress=False)
    elif name == 'score fast':  # analysis without gradients up to T' (here: 100), then 16 timesteps' gradients
        analyze_timesteps((u, s), x0, 0.05, stride=20, until_threshold=True, progress=False)
        ts, w = stratified_timesteps(range(100), 16, 0)
        per = min(len(ts), max(1, arg // len(x0)))  # timesteps per pass: 16 at most
        accumulate_gradients(u, s, x0, noise, ts, w, timesteps_per_pass=per, progress=False)
        arg = per * len(x0)  # the images a pass really held
    elif name == 'finetune':  # on random images of the model's shape (the digits have one channel, CIFAR three)
        finetune((u, s), Images(torch.rand(256, *sample_shape(u), generator=g) * 2 - 1), steps=2, batch_size=arg,
                 device=device, progress=False)
    elif name == 'sample':
        ddim_sample(u, s, arg, steps=2, images_per_pass=arg, progress=False)
    secs = time.perf_counter() - t0
    peak = peak_mib(device)
    return dict(phase=name, images=arg, peak_mib=peak, above_model_mib=peak - base, model_mib=base, seconds=secs)

if __name__ == '__main__':
    p = parser(__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--quick', action='store_true')
    p.add_argument('--images-per-pass', type=int, nargs='+', default=None, help="scoring pass sizes")
    p.add_argument('--phase', nargs=2, metavar=('NAME', 'IMAGES'), help=argparse.SUPPRESS)  # a child's one phase
    p.add_argument('--name', default='memory')
    a = p.parse_args()
    if a.phase:  # a child: one phase, its result as the last line of stdout
        print(json.dumps(phase(a.phase[0], int(a.phase[1]), a.quick, a.device)))
        sys.exit(0)
    cuda = torch.device(a.device).type == 'cuda'
    ipps = a.images_per_pass or ([8, 16] if a.quick else [8, 32, 128] if not cuda else [32, 128, 512])
    big = 8 if a.quick else (64 if not cuda else 256)
    jobs = ([('score exact', k) for k in ipps] + [('score fast', k) for k in ipps[:1 if a.quick else None]]
            + [('finetune', min(big, 64)), ('sample', big)])
    rows = []
    for name, k in jobs:
        if cuda:  # the allocator's own peak, reset per phase: one process will do
            if not rows: phase('sample', 2, a.quick, a.device)  # cuDNN's one-time workspace, before any baseline
            rows.append(phase(name, k, a.quick, a.device))
            torch.cuda.empty_cache()
        else:  # the resident set's peak never goes down: a process per phase
            cmd = [sys.executable, __file__, '--phase', name, str(k), '--device', a.device] + (['--quick'] if a.quick else [])
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode: sys.exit(f"{name} {k}: failed\n{r.stderr[-3000:]}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(table(rows[-1:], ['phase', 'images', 'peak_mib', 'above_model_mib', 'seconds']), flush=True)
    ex = [r for r in rows if r['phase'] == 'score exact']
    if len({r['images'] for r in ex}) < 2: sys.exit("--images-per-pass needs two sizes or more to fit the memory per image")
    # MiB per image in a scoring pass: a least-squares line through every pass size measured
    n, xs, ys = len(ex), [r['images'] for r in ex], [r['above_model_mib'] for r in ex]
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    fixed = my - slope * mx
    fits = ({f'{gib} GiB': max(0, int((gib * 1024 - ex[0]['model_mib'] - fixed) / slope)) for gib in (8, 16, 24, 80)}
            if slope > 0 else {})  # a flat line (noise of a tiny model's resident set) predicts nothing
    print(table(rows, ['phase', 'images', 'peak_mib', 'above_model_mib', 'model_mib', 'seconds']))
    print(f"exact-mode scoring: {slope:.1f} MiB per image in a pass (+{fixed:.0f} MiB); images per pass that fit: {fits}")
    write(a.out, f"{a.name}_{'cuda' if cuda else 'cpu'}" + ('_quick' if a.quick else ''),
          dict(rows=rows, mib_per_image=slope, fixed_mib=fixed, images_per_pass_that_fit=fits, args=vars(a)))
