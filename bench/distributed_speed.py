"""Wall time of scoring split over processes (issue #32): exact-mode Diff-Pruning scoring of the digits teacher (64
calibration images, every fifth timestep up to T') in one process and in two under torchrun, each process with one thread,
and one process with as many threads as there are processes, side by side in one run. Every run ends with the same
gradients (tests/test_distributed.py); here only time is measured.

    python bench/distributed_speed.py          # about 3 minutes on two CPU cores
    python bench/distributed_speed.py --quick  # seconds
"""
import json, os, subprocess, sys, tempfile, time
from pathlib import Path
from common import parser, write, table

def worker(out:str, quick:bool):
    import torch
    from diffprune.importance import score_model
    score_model('digits', calibration_size=8, stride=100, progress=False)  # warm: imports, first calls
    t0 = time.perf_counter()
    s = score_model('digits', calibration_size=8 if quick else 64, stride=50 if quick else 5, progress=False)
    if int(os.environ.get('RANK', 0)) == 0:
        Path(out).write_text(json.dumps(dict(seconds=time.perf_counter() - t0, passes=s.passes,
                                             threads=torch.get_num_threads())))

def main():
    p = parser(__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true')
    p.add_argument('--processes', type=int, default=2)
    p.add_argument('--worker', help='(internal) one process of a run, writing its time here')
    a = p.parse_args()
    if a.worker: return worker(a.worker, a.quick)
    n, tmp, rows = a.processes, Path(tempfile.mkdtemp()), []
    torchrun = str(Path(sys.executable).parent/'torchrun')
    arms = {f'1 process, 1 thread': ([sys.executable], '1'), f'1 process, {n} threads': ([sys.executable], str(n)),
            f'{n} processes, 1 thread each': ([torchrun, '--standalone', '--nproc_per_node', str(n)], '1')}
    for arm, (cmd, threads) in arms.items():
        out = tmp/f'{len(rows)}.json'
        subprocess.run(cmd + [__file__, '--worker', str(out)] + (['--quick'] if a.quick else []), check=True,
                       env={**os.environ, 'OMP_NUM_THREADS': threads})
        rows.append(dict(arm=arm, **json.loads(out.read_text())))
    base = rows[0]['seconds']
    for r in rows: r['speedup'] = base / r['seconds']
    print(table(rows, ['arm', 'seconds', 'speedup', 'passes', 'threads']))
    write(a.out, 'distributed_speed' + ('_quick' if a.quick else ''), dict(rows=rows))

if __name__ == '__main__':
    main()
