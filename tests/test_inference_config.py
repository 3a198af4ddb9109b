"""Inference settings: each method's typed ``Settings``, ``--set test.KEY=VALUE`` on demo/test, a
checkpoint's own settings, the CLI help derived from the settings, and YAML numbers in scientific
notation."""
import pytest
import torch

from viddet.checkpoints.loading import load_model
from viddet.cli import main
from viddet.config.typed import method_settings
from viddet.config.files import parse_override, parse_test_overrides, yaml_load
from viddet.errors import VidDetError
from viddet.methods import DFF, FGFA, SELSA, build_method

pytestmark = pytest.mark.usefixtures('one_thread')


def test_parse_test_settings_are_typed_and_checked():
    assert parse_test_overrides(['test.num_refs=3', 'test.fast=false']) == {'num_refs': 3, 'fast': False}
    with pytest.raises(VidDetError, match="expected test.KEY=VALUE"):
        parse_test_overrides(['schedule.lr=0.1'])
    assert method_settings(SELSA, {'num_refs': 3, 'fast': False}, '--set') == SELSA.Settings(num_refs=3, fast=False)
    with pytest.raises(VidDetError, match='selsa has no setting test.num_ref .*did you mean test.num_refs'):
        method_settings(SELSA, {'num_ref': 3}, '--set')
    with pytest.raises(VidDetError, match='test.num_left must be an integer, got 1.5'):
        method_settings(FGFA, {'num_left': 1.5}, '--set')
    with pytest.raises(VidDetError, match=r'--set: test.key_frame_interval must be >= 1, got 0'):
        method_settings(DFF, {'key_frame_interval': 0}, '--set')


def test_a_setting_of_another_method_is_refused_with_the_methods_own():
    with pytest.raises(VidDetError, match=r'dff has no setting test.num_refs; its settings: fast, key_frame_interval'):
        method_settings(DFF, {'num_refs': 3}, '--set')


def test_the_cli_help_lists_every_methods_settings_from_their_dataclasses(capsys):
    with pytest.raises(SystemExit):
        main(['test', '--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert 'dff: key_frame_interval (10)' in text and 'fgfa: num_left (15), num_right (15)' in text
    assert 'selsa: num_refs (14), ref_cache (True)' in text and 'every method: fast (True)' in text


def test_settings_reach_the_model_and_override_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / 'dff.pth'
    meta = {'config': {'model': {'test': {'key_frame_interval': 4}}}}
    torch.save({'state_dict': build_method('dff', 'mobilenetv2').state_dict(), 'meta': meta}, path)
    assert load_model(str(path)).model.key_frame_interval == 4            # the checkpoint's own
    assert load_model(str(path), key_frame_interval=2).model.key_frame_interval == 2
    loaded = load_model(str(path), fast=False)
    from viddet import speedups
    assert not speedups.is_converted(loaded.model) and speedups.is_converted(load_model(str(path)).model)
    assert loaded.test == DFF.Settings(key_frame_interval=4, fast=False)
    with pytest.raises(VidDetError, match='dff has no setting test.num_reff'):
        load_model(str(path), num_reff=2)


def test_cli_set_reaches_the_demo(tmp_path, capsys):
    import cv2
    import numpy as np
    frames = tmp_path / 'frames'
    frames.mkdir()
    for i in range(2):
        cv2.imwrite(str(frames / f'{i:06d}.png'), np.full((48, 64, 3), 40 * i, np.uint8))
    rc = main(['demo', str(frames), '--random-weights', '--method', 'dff', '--backbone', 'mobilenetv2',
               '--set', 'test.key_frame_interval=1', '--set', 'test.num_refs=2', '--out', str(tmp_path / 'o.mp4'),
               '--threads', '1'])
    err = capsys.readouterr().err
    assert rc == 2 and 'dff has no setting test.num_refs' in err
    rc = main(['demo', str(frames), '--random-weights', '--method', 'dff', '--backbone', 'mobilenetv2',
               '--set', 'test.key_frame_interval=1', '--out', str(tmp_path / 'o.mp4'), '--threads', '1'])
    assert rc == 0, capsys.readouterr().err
    rc = main(['demo', str(frames), '--random-weights', '--set', 'test.num_refs=0', '--out', str(tmp_path / 'p.mp4')])
    assert rc == 2 and 'test.num_refs must be >= 1' in capsys.readouterr().err


def test_yaml_reads_scientific_notation_and_reports_lines():
    assert yaml_load('lr: 1e-4\nwd: 5E-5\nn: 10\nx: 1.0e-3\ns: abc', 'c.yaml') == \
        {'lr': 1e-4, 'wd': 5e-5, 'n': 10, 'x': 1e-3, 's': 'abc'}
    assert parse_override('schedule.lr=2e-3') == ('schedule.lr', 2e-3)
    with pytest.raises(VidDetError, match=r'c.yaml: not valid YAML at line 3, column \d+'):
        yaml_load('a: 1\nb: [1, 2\nc: 3\n', 'c.yaml')
