"""Importance speed: the paper's per-timestep loop against diffprune's exact and fast modes.

The baseline is the reference procedure written plainly: one calibration batch and one noise tensor; for t = 0, 1, ...
one forward and backward pass at t (gradients accumulate), stopping once L_t < thr * max_{s<=t} L_s. diffprune's exact
mode (`taylor_gradients`) makes the same sweep with several timesteps stacked into each pass (32, 64 and 128 images
per pass are compared; the library's default, `default_images_per_pass`, is 128 for the digits teacher and 32 for the
CIFAR-10 UNet on a CPU) and gets L_t from the same forward passes; fast mode analyses every 20th timestep without
gradients, only up to T', then accumulates the gradients of k stratified timesteps from [0, T']. Reported: wall time
ratios against the baseline, run side by side in this process, and the Jaccard agreement of the channels each keeps
at half the MACs.

    python bench/importance_speed.py            # digits teacher (batch 64) and the CIFAR-10 UNet (random weights, batch 4)
"""
import time, torch
from diffusers import UNet2DModel, DDPMScheduler
from common import parser, write, table
from diffprune.models import load_model, CIFAR10_CONFIG
from diffprune.diffusion import eps_loss
from diffprune.data import get_dataset, take
from diffprune.timesteps import analyze_timesteps
from diffprune.importance import (accumulate_gradients, taylor_gradients, stratified_timesteps, ScoredModel,
                                  importance_criterion, take_gradients)
from diffprune.prune import jaccard
from diffprune.unet import kept_channels

def paper_loop(unet, sched, x0, noise, thr, max_t=None):
    "The reference loop: backward per timestep from t=0 until the loss falls below thr x its running max."
    unet.zero_grad(set_to_none=True)
    run_max = 0.
    t_prime = 0
    for t in range(max_t or sched.config.num_train_timesteps):
        l = eps_loss(unet, sched, x0, noise, torch.full((len(x0),), t, device=x0.device))
        run_max = max(run_max, l.item())
        if l.item() < thr * run_max: break
        l.backward()
        t_prime = t
    return t_prime

def kept(unet, sched):
    crit = importance_criterion('diff-pruning')
    return kept_channels(ScoredModel(unet, sched, 'diff-pruning', crit, take_gradients(unet)), target_macs=0.5)

def bench(name, unet, sched, x0, thr, ks, ipps, max_t=None, seed=0):
    "Baseline, exact and fast modes on one model, side by side; rows of seconds, speedups and kept-channel agreement."
    sync = torch.cuda.synchronize if x0.is_cuda else (lambda: None)  # the clock is read after the GPU's work is done
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0.device)
    rows = []
    t0 = time.perf_counter()
    t_prime = paper_loop(unet, sched, x0, noise, thr, max_t)
    sync()
    t_base = time.perf_counter() - t0
    base = kept(unet, sched)
    rows.append(dict(model=name, mode='paper loop', seconds=t_base, speedup=1.0, jaccard=1.0, backward_passes=t_prime + 1, t_prime=t_prime))
    # exact: analysis and gradients in one sweep, `ipp` images (timesteps x batch) per pass; pass sizes that stack the
    # same number of timesteps for this batch are run once
    for ipp in sorted({max(1, ipp // len(x0)) * len(x0) for ipp in ipps}):
        t0 = time.perf_counter()
        ana, passes = taylor_gradients(unet, sched, x0, noise, thr, range(max_t or sched.config.num_train_timesteps), images_per_pass=ipp, progress=False)
        sync()
        t_ex = time.perf_counter() - t0
        rows.append(dict(model=name, mode=f'exact ipp={ipp}', images_per_pass=ipp, seconds=t_ex, speedup=t_base / t_ex,
                         jaccard=jaccard(base, kept(unet, sched)), backward_passes=passes, t_prime=ana.t_prime))
    for k in ks:  # fast: a strided analysis up to T' (score_model's default stride T/50), then k stratified timesteps
        t0 = time.perf_counter()
        if max_t: tp_fast = max_t - 1
        else: tp_fast = analyze_timesteps((unet, sched), x0, thr, stride=sched.config.num_train_timesteps // 50, until_threshold=True, seed=seed, progress=False).t_prime
        p = accumulate_gradients(unet, sched, x0, noise, *stratified_timesteps(range(tp_fast + 1), k, seed), progress=False)
        sync()
        t_f = time.perf_counter() - t0
        rows.append(dict(model=name, mode=f'fast k={k}', seconds=t_f, speedup=t_base / t_f, jaccard=jaccard(base, kept(unet, sched)), backward_passes=p, t_prime=tp_fast))
    return rows

if __name__ == '__main__':
    p = parser(__doc__.split('\n')[0])
    p.add_argument('--digits-batch', type=int, default=64)
    p.add_argument('--cifar-batch', type=int, default=4)
    p.add_argument('--cifar-timesteps', type=int, default=100, help="kept timesteps for the random-weight CIFAR UNet (its L_t never falls)")
    p.add_argument('--ks', type=int, nargs='+', default=[8, 16, 32])
    p.add_argument('--skip-cifar', action='store_true')
    p.add_argument('--images-per-pass', type=int, nargs='+', default=[32, 64, 128], help="exact mode's pass sizes to compare")
    p.add_argument('--device', default='cpu')
    p.add_argument('--digits-timesteps', type=int, default=None, help="stop the digits sweeps here (default: at T')")
    p.add_argument('--quick', action='store_true', help="8 digits images, 20 timesteps, no CIFAR: checks the script runs")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    if a.quick: a.digits_batch, a.digits_timesteps, a.ks, a.images_per_pass, a.skip_cifar = 8, 20, [8], [16], True
    u, s = load_model('digits', a.device)
    x = take(get_dataset('digits'), a.digits_batch, seed=a.seed).to(a.device)
    rows = bench('digits teacher', u, s, x, 0.05, a.ks, a.images_per_pass, max_t=a.digits_timesteps, seed=a.seed)
    if not a.skip_cifar:
        cu = UNet2DModel(**CIFAR10_CONFIG).to(a.device)
        cs = DDPMScheduler(num_train_timesteps=1000)
        x = torch.rand(a.cifar_batch, 3, 32, 32, generator=torch.Generator().manual_seed(a.seed)) * 2 - 1
        rows += bench('cifar10 config (random)', cu, cs, x.to(a.device), 0.05, a.ks, a.images_per_pass, max_t=a.cifar_timesteps, seed=a.seed)
    print(table(rows, ['model', 'mode', 't_prime', 'backward_passes', 'seconds', 'speedup', 'jaccard']))
    kind = torch.device(a.device).type
    write(a.out, 'importance_speed' + ('' if kind == 'cpu' else f'_{kind}') + ('_quick' if a.quick else ''), dict(rows=rows, args=vars(a)))
