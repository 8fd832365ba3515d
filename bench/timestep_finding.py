"""The timestep finding (the paper's RQ2) on digits: how thr sets T', and how much T' changes the channels kept.

For each threshold, Diff-Pruning scores the digits teacher with the same calibration batch and noise (every `stride`-th
timestep up to T'), and the channels kept at half the MACs are compared by Jaccard agreement with those of thr = 0.05
(the default) and of thr = 0 (every timestep, which is Taylor over all timesteps). Calibration noise sets the floor:
the agreement of thr = 0.05 with itself under another seed's calibration batch. A threshold changes what is kept only
where its agreement with thr = 0.05 falls clearly below that floor. The FID each choice leads to is in the paper table.

    python bench/timestep_finding.py                 # thresholds 0 .. 0.2, 3 seeds, 32 calibration images
"""
import itertools, statistics
from common import parser, write, table
from diffprune.importance import score_model
from diffprune.prune import jaccard
from diffprune.unet import kept_channels

if __name__ == '__main__':
    p = parser(__doc__.split('\n')[0])
    p.add_argument('--thresholds', type=float, nargs='+', default=[0., 0.01, 0.02, 0.05, 0.1, 0.2])
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--calib', type=int, default=32)
    p.add_argument('--stride', type=int, default=5)
    p.add_argument('--target', type=float, default=0.5)
    a = p.parse_args()
    if 0.05 not in a.thresholds or 0. not in a.thresholds: p.error("--thresholds must include 0 and 0.05 (the references)")
    kept, tprime, seeds = {}, {}, range(a.seed, a.seed + a.seeds)
    for seed in seeds:
        for thr in a.thresholds:
            imp = score_model('digits', 'digits', 'diff-pruning', thr, calibration_size=a.calib, stride=a.stride, seed=seed, progress=False)
            kept[thr, seed] = kept_channels(imp, target_macs=a.target)
            tprime[thr, seed] = (imp.analysis.t_prime, len(imp.analysis.kept_timesteps))
            print(f'thr {thr}, seed {seed}: T\' = {tprime[thr, seed][0]}', flush=True)
    floor = [jaccard(kept[0.05, s], kept[0.05, u]) for s, u in itertools.combinations(seeds, 2)]
    rows = []
    for thr in a.thresholds:
        rows.append(dict(threshold=thr, t_prime_mean=statistics.mean(tprime[thr, s][0] for s in seeds),
                         t_prime_min=min(tprime[thr, s][0] for s in seeds), t_prime_max=max(tprime[thr, s][0] for s in seeds),
                         timesteps_scored=statistics.mean(tprime[thr, s][1] for s in seeds),
                         jaccard_vs_thr005=statistics.mean(jaccard(kept[thr, s], kept[0.05, s]) for s in seeds),
                         jaccard_vs_thr0=statistics.mean(jaccard(kept[thr, s], kept[0., s]) for s in seeds)))
    print(table(rows, ['threshold', 't_prime_mean', 't_prime_min', 't_prime_max', 'timesteps_scored', 'jaccard_vs_thr005', 'jaccard_vs_thr0']))
    print(f'floor (thr 0.05 against itself, other calibration seed): Jaccard {statistics.mean(floor):.3f} (min {min(floor):.3f})')
    write(a.out, 'timestep_finding', dict(rows=rows, seed_floor=dict(mean=statistics.mean(floor), min=min(floor), max=max(floor)), args=vars(a)))
