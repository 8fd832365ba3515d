"""bench/gpu.sh, the GPU benchmarks in one go, runs on a CPU with `--device cpu --quick`: so a GPU session only has to
start it. Its quick run writes the JSON that the benchmark notebook reads, with every configuration it names."""
import json, os, subprocess, sys
import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

@pytest.mark.slow  # a benchmark's harness on tiny settings (a minute of CPU): the slow tier
def test_gpu_script_runs_quick_on_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, MPLBACKEND='Agg', HF_HUB_OFFLINE='1')
    r = subprocess.run(['bash', str(ROOT/'bench'/'gpu.sh'), '--device', 'cpu', '--quick', '--out', str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    speed = json.loads((tmp_path/'speedup_vs_macs_cpu_quick.json').read_text())
    configs = {(x['dtype'], x['mode'], x['batch']) for x in speed['rows']}
    assert {('fp32', 'eager', 1), ('bf16', 'reduce-overhead', 2), ('fp32', 'default', 2)} <= configs
    assert all(x['compile_s'] > 0 for x in speed['rows'] if x['mode'] != 'eager' and x['model'] == 'teacher')
    assert {v['mode'] for v in speed['verdicts']} == {'eager', 'default', 'reduce-overhead'}
    mem = json.loads((tmp_path/'memory_cpu_quick.json').read_text())
    assert {x['phase'] for x in mem['rows']} == {'score exact', 'score fast', 'finetune', 'sample'}
    assert isinstance(mem['mib_per_image'], float) and all(x['above_model_mib'] > 0 for x in mem['rows'])
    imp = json.loads((tmp_path/'importance_speed_quick.json').read_text())
    assert {x['mode'] for x in imp['rows']} >= {'paper loop', 'exact ipp=16', 'fast k=8'}
    # the two measurements no GPU has run yet: UNet depth on an SD-1.5-sized UNet (#30), a FLUX.1-wide one (#29)
    sd = json.loads((tmp_path/'unet_depth_sd15_quick.json').read_text())
    assert {x['arm'] for x in sd['speed']} == {'teacher', 'bk-sdm-small', 'width'} and sd['units_removed']
    flux = json.loads((tmp_path/'flux_speed_quick.json').read_text())
    assert {x['prune'] for x in flux['rows']} == {'teacher', 'width', 'depth'}
    assert all(x['macs_reduction'] > 1.5 for x in flux['rows'] if x['prune'] != 'teacher')
    quant = json.loads((tmp_path/'quantize_gpu_quick.json').read_text())  # pruned and quantized (#31)
    assert {x['arm'] for x in quant['speed']} >= {'teacher', 'pruned', 'pruned+int8-weight', 'teacher+int8-dynamic'}
    shards = json.loads((tmp_path/'fsdp_memory_quick.json').read_text())  # sharded state (#32): half on two processes
    assert all(abs(x['2 process'] / x['1 process'] - 0.5) < 0.01 for x in shards['measured'])

def test_gpu_script_refuses_an_unknown_argument_in_one_line():
    r = subprocess.run(['bash', str(ROOT/'bench'/'gpu.sh'), '--fast'], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and '--fast' in r.stderr, r.stderr

def quick_run(script:str, tmp_path) -> dict:
    "`bench/SCRIPT --quick`, run to its end with the results in `tmp_path`; its JSON."
    env = dict(os.environ, MPLBACKEND='Agg', HF_HUB_OFFLINE='1')
    r = subprocess.run([sys.executable, script, '--quick', '--out', str(tmp_path)], cwd=ROOT/'bench',
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads((tmp_path/script.replace('.py', '_quick.json')).read_text())

@pytest.mark.slow  # a benchmark's harness on tiny settings (a minute of CPU): the slow tier
def test_layouts_bench_runs_quick_and_pairs_the_layouts_at_the_same_macs(tmp_path):
    "bench/layouts.py --quick: the three layouts of each seed, the free-form one matched to the diffusers one's MACs."
    res = quick_run('layouts.py', tmp_path)
    runs = {x['layout']: x for x in res['runs']}
    assert set(runs) == {'diffusers', 'free-form matched', 'free-form'}
    assert runs['diffusers']['macs_fraction'] <= 0.5 < runs['free-form']['macs_fraction'] + 0.01
    assert abs(runs['free-form matched']['macs_fraction'] - runs['diffusers']['macs_fraction']) < 0.01
    assert {x['layout'] for x in res['speed']} == {'teacher', *runs} and res['verdict']

@pytest.mark.slow  # a benchmark's harness on tiny settings (a minute of CPU): the slow tier
def test_transformer_bench_runs_quick_with_every_method_and_kind_at_the_target(tmp_path):
    "bench/transformer.py --quick: the four methods by width and Diff-Pruning by depth and both, each within the MACs."
    res = quick_run('transformer.py', tmp_path)
    arms = {(x['method'], x['prune']) for x in res['runs']}
    assert arms == {('teacher', None), *((m, 'width') for m in ('diff-pruning', 'taylor', 'magnitude', 'random')),
                    ('diff-pruning', 'depth'), ('diff-pruning', 'both')}
    assert all(x['macs_fraction'] <= 0.5 for x in res['runs'] if x['method'] != 'teacher')
    depth = next(x for x in res['runs'] if x['prune'] == 'depth')
    assert 0 in depth['blocks_kept'] and len(depth['blocks_kept']) < 8
    assert {x['prune'] for x in res['speed']} == {'teacher', 'width', 'depth', 'both'} and len(res['verdicts']) == 8

@pytest.mark.slow  # a benchmark's harness on tiny settings (a minute of CPU): the slow tier
def test_unet_depth_bench_runs_quick_and_pairs_depth_with_width_at_its_macs(tmp_path):
    "bench/unet_depth.py --quick: depth and both, each against width at the MACs it reached; the CIFAR-10 preset."
    res = quick_run('unet_depth.py', tmp_path)
    runs = {x['arm']: x for x in res['runs']}
    assert set(runs) == {'teacher', 'depth', 'width@depth', 'both', 'width'}
    assert runs['depth']['units_removed'] and not runs['width@depth']['units_removed']
    for deep, wide in (('depth', 'width@depth'), ('both', 'width')):
        assert abs(runs[deep]['macs_fraction'] - runs[wide]['macs_fraction']) < 0.01
    assert {(x['model'], x['arm']) for x in res['speed']} >= {('cifar10', 'bk-sdm-small'), ('cifar10', 'width')}

@pytest.mark.slow  # a benchmark's harness on tiny settings (a minute of CPU): the slow tier
def test_quantize_bench_runs_quick_with_every_arm_of_both_models(tmp_path):
    "bench/quantize.py --quick: teacher and pruned, plain and quantized both ways, for the digits UNet and DiT."
    res = quick_run('quantize.py', tmp_path)
    arms = {'teacher', 'pruned', *(f'{m}+{s}' for m in ('teacher', 'pruned') for s in ('int8-weight', 'int8-dynamic'))}
    assert {(x['model'], x['arm']) for x in res['runs']} == {(m, a) for m in ('digits', 'digits-dit') for a in arms}
    mb = {(x['model'], x['arm']): x['bytes'] for x in res['runs']}
    assert all(mb[m, 'pruned+int8-weight'] < mb[m, 'pruned'] < mb[m, 'teacher'] for m in ('digits', 'digits-dit'))
    assert len(res['verdicts']) == 8 + 10 * len(res['args']['batches'])
