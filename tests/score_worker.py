"""Run by tests under torchrun (or imported): score the digits teacher as each `MODE[:fsdp]` argument says, prune it,
and save this process's gradients and cut as `grads{rank}-{config}.safetensors` and `cut{rank}-{config}.json`."""
import json, os, sys, time, torch
from pathlib import Path
from safetensors.torch import save_file
from diffprune.importance import score_model
from diffprune.prune import prune_model
from diffprune.models import kept_channels

def score(out:Path, config:str):
    """`config`: 'exact' or 'fast', with ':fsdp' to score a sharded copy, or ':skew' to let each process choose its own
    pass size (8 images on the first, 16 on the second, as GPUs with other free memory would)."""
    import diffprune.importance as imp
    mode, fsdp, skew = config.split(':')[0], config.endswith(':fsdp'), config.endswith(':skew')
    rank = int(os.environ.get('RANK', 0))
    if skew: imp.default_images_per_pass = lambda model, device=None: 8 * (1 + rank)
    t0 = time.perf_counter()
    s = score_model('digits', calibration_size=8, sampled_timesteps=8 if mode == 'fast' else None, progress=False,
                    stride=None if mode == 'fast' else 20, images_per_pass=None if skew else 8,  # 8: one t alone
                    fsdp=fsdp)
    seconds, res = time.perf_counter() - t0, prune_model(s, target_macs=0.6)
    name = config.replace(':', '-')
    save_file({n: g.contiguous() for n, g in s.gradients.items()}, out/f'grads{rank}-{name}.safetensors')
    (out/f'cut{rank}-{name}.json').write_text(json.dumps(dict(kept=kept_channels(res.denoiser), timesteps=list(s.timesteps),
                                                             t_prime=s.analysis.t_prime, passes=s.passes, seconds=seconds)))

if __name__ == '__main__':
    torch.set_num_threads(1)
    for config in sys.argv[2:]: score(Path(sys.argv[1]), config)
