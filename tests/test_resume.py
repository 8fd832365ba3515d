"The recipe survives a disconnect: killed with SIGKILL in any step, `--resume` ends where an uninterrupted run ends."
import json, multiprocessing, os, signal
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from diffprune.checks import InputError
from diffprune.report import RECIPES, recipe_settings, run_recipe, write_report

SMALL = dict(stride=100, calibration_size=8, steps=6, batch_size=8, num_samples=8, sample_steps=4, checkpoint_every=2,
             dropout=0.1, spacing='quad')

def _go(out, stage, at):
    "One run of the recipe, killed with SIGKILL by itself where asked: at a step's start, or at a finetune step."
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    on_stage = lambda name: die() if name == stage and at == 0 else None
    callback = lambda step, history: die() if stage == 'finetune' and step == at else None
    write_report(run_recipe(progress=False, out=out, resume=True, on_stage=on_stage, callback=callback,
                            callback_every=1, **SMALL), out)

def run(out, stage='none', at=0) -> int:
    "`_go` in a process of its own; its exit code."
    # forked from a server that imported diffprune and ran nothing (a second, not five, per run); forked from this
    # process instead, a child can hang in OpenMP when earlier tests ran torch's thread pool
    ctx = multiprocessing.get_context('forkserver')
    ctx.set_forkserver_preload(['diffprune.report'])
    p = ctx.Process(target=_go, args=(str(out), stage, at))
    p.start(); p.join()
    return p.exitcode

@pytest.fixture(scope='module')
def straight(tmp_path_factory) -> Path:
    "One uninterrupted run of the recipe, shared by the tests that compare with it."
    out = tmp_path_factory.mktemp('resume')/'straight'
    assert run(out) == 0
    return out

def test_killed_in_each_kind_of_step_resumes_to_the_same_result(tmp_path, straight):
    # one run, killed after each kind of state is kept: the analysis and the scores (pruning next), a finetune
    # checkpoint (killed between two), the finetuned model (evaluation next); resumed each time
    for stage, at in [('prune', 0), ('finetune', 3), ('evaluate', 0)]:
        assert run(tmp_path/'killed', stage, at) == -signal.SIGKILL, (stage, at)
    assert run(tmp_path/'killed') == 0
    a, b = (json.loads((k/'result.json').read_text()) for k in (straight, tmp_path/'killed'))
    assert a['pruned']['fid'] == b['pruned']['fid'] and a['ssim'] == b['ssim']
    assert {**a['prune'], 'seconds': 0} == {**b['prune'], 'seconds': 0}
    wa, wb = (load_file(next((k/'model').rglob('*.safetensors'))) for k in (straight, tmp_path/'killed'))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
    stages = tmp_path/'killed'/'stages'
    assert {p.name for p in stages.iterdir()} == {'settings.json', 'analysis.json', 'scores', 'pruned', 'finetune',
                                                  'evaluation', 'times.json'}
    assert not list(stages.rglob('.*tmp*'))  # what the kills left half-written is gone

def test_a_finished_run_resumes_from_its_kept_steps_without_redoing_them(tmp_path, monkeypatch, straight):
    "Every step kept: no analysis, scoring or sampling again, the same evaluation, and each step's first time."
    import shutil
    import diffprune.report as report
    shutil.copytree(straight, tmp_path/'done')  # a copy: this test rewrites a kept step
    first = json.loads((tmp_path/'done'/'result.json').read_text())
    def redone(*a, **k): raise AssertionError('a kept step was computed again')
    for name in ('analyze_timesteps', 'score_model', 'evaluate'): monkeypatch.setattr(report, name, redone)
    again = run_recipe(progress=False, out=tmp_path/'done', resume=True, **SMALL).to_dict()
    assert again['pruned'] == first['pruned'] and again['teacher'] == first['teacher'] and again['ssim'] == first['ssim']
    assert again['step_seconds'] == first['step_seconds']  # each step's time is that of the run that completed it
    # an evaluation measured elsewhere (say on a GPU before a disconnect) is measured again where the run goes on
    kept = tmp_path/'done'/'stages'/'evaluation'/'evaluation.json'
    kept.write_text(json.dumps({**json.loads(kept.read_text()), 'settings': {'device': 'cuda', 'compile': False}}))
    with pytest.raises(AssertionError, match='computed again'):
        run_recipe(progress=False, out=tmp_path/'done', resume=True, **SMALL)

def test_a_kept_run_is_not_overwritten_or_resumed_with_other_settings(tmp_path):
    (tmp_path/'stages').mkdir()
    (tmp_path/'stages'/'settings.json').write_text(json.dumps(vars(recipe_settings(**SMALL))))
    with pytest.raises(InputError, match='holds a run: resume it'): run_recipe(out=tmp_path, progress=False, **SMALL)
    with pytest.raises(InputError, match="steps: 6 there, 7 now"):
        run_recipe(out=tmp_path, resume=True, progress=False, **{**SMALL, 'steps': 7})

def test_recipes_are_settings():
    paper = recipe_settings('paper-cifar10')
    assert (paper.pruning_ratio, paper.steps, paper.ema, paper.dropout, paper.spacing) == (0.3, 100_000, 0.9999, 0.1, 'quad')
    assert recipe_settings('paper-cifar10', steps=10).steps == 10
    asked = recipe_settings('paper-cifar10', target_macs=0.5)  # a MACs target replaces the recipe's pruning ratio
    assert (asked.target_macs, asked.pruning_ratio) == (0.5, None)
    assert set(RECIPES) >= {'paper-cifar10', 'paper-cifar10-colab', 'digits-cpu'}
    with pytest.raises(InputError, match='recipe'): recipe_settings('paper-cifar100')

def test_run_flags_change_one_setting_of_the_named_recipe():
    from diffprune.cli import parser, _settings
    s = _settings(parser().parse_args(['run', '--recipe', 'paper-cifar10', '--steps', '10', '--target-macs', '0.5',
                                       '--out', 'x']))
    assert (s.steps, s.target_macs, s.pruning_ratio) == (10, 0.5, None)  # a target given replaces the recipe's ratio
    assert (s.ema, s.dropout, s.spacing, s.device, s.model) == (0.9999, 0.1, 'quad', 'cuda', 'google/ddpm-cifar10-32')
    plain = _settings(parser().parse_args(['run', '--dropout', '0.2', '--out', 'x']))
    assert (plain.dropout, plain.device, plain.steps, plain.layout) == (0.2, 'cpu', 500, 'free-form')  # the defaults

def test_a_kept_run_is_named_on_the_command_line_and_paths_compare_as_text(tmp_path, capsys):
    from pathlib import Path
    from diffprune.cli import main
    from diffprune.report import _as_json
    (tmp_path/'stages').mkdir()
    (tmp_path/'stages'/'settings.json').write_text(json.dumps(_as_json(recipe_settings(data=Path('imgs')))))
    assert json.loads((tmp_path/'stages'/'settings.json').read_text())['data'] == 'imgs'
    assert main(['run', '--out', str(tmp_path)]) == 2  # not "--overwrite": that would delete the kept steps
    assert 'holds a run: add --resume' in capsys.readouterr().err
    assert (tmp_path/'stages'/'settings.json').exists()
