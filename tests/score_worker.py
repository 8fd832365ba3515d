"Run by tests under torchrun (or alone): score the digits teacher, prune it, save this process's gradients and cut."
import json, os, sys, time, torch
from pathlib import Path
from safetensors.torch import save_file
from diffprune.importance import score_model
from diffprune.prune import prune_model
from diffprune.models import kept_channels

out, mode, fsdp = Path(sys.argv[1]), sys.argv[2], sys.argv[3:] == ['fsdp']  # mode: 'exact' or 'fast'
torch.set_num_threads(1)
t0 = time.perf_counter()
s = score_model('digits', calibration_size=8, sampled_timesteps=8 if mode == 'fast' else None, progress=False,
                stride=None if mode == 'fast' else 20, images_per_pass=8,  # 8 images a pass: one timestep alone
                fsdp=fsdp)
seconds = time.perf_counter() - t0
res = prune_model(s, target_macs=0.6)
rank = int(os.environ.get('RANK', 0))
save_file({n: g.contiguous() for n, g in s.gradients.items()}, out/f'grads{rank}.safetensors')
(out/f'cut{rank}.json').write_text(json.dumps(dict(kept=kept_channels(res.denoiser), t_prime=s.analysis.t_prime,
                                                   timesteps=list(s.timesteps), passes=s.passes, seconds=seconds)))
