"""Control messages of pipelines.control: checked, then train flags (fast
tier; the loop itself is in tests/test_control.py)."""

import pytest

from pipelines import control


def test_control_messages_are_checked_and_become_train_flags():
  good = {'deployment_id': 'd1', 'topic': 'data', 'input_format': 'avro',
          'input_config': {'avro_schema': {'type': 'record', 'name': 'r',
                                           'fields': []}, 'schema_id': 4},
          'validation_rate': 0.25, 'total_msg': 15,
          'ranges': {'0': [5, 15], '1': [0, 5]}, 'publish_state': 'live',
          'model_name': 'm', 'runner': 'prism'}
  argv = control.train_argv(control.check(good), 'hcopd', 'b:1', 'models',
                            '/out', ['--runner', 'direct'])
  flag = lambda name: argv[len(argv) - 1 - argv[::-1].index(name) + 1]
  assert flag('--from_offsets') == '{"0": 5, "1": 0}'
  assert flag('--to_offsets') == '{"0": 15, "1": 5}'
  assert flag('--eval_percent') == '25' and flag('--avro_schema_id') == '4'
  assert flag('--runner') == 'prism'  # the message's runner wins
  assert flag('--publish_state') == 'live' and flag('--model_name') == 'm'
  assert '--model_topic' not in control.train_argv(
      good, 'hcopd', 'b:1', None, '/out')
  for bad, reason in (
      ({**good, 'total_msg': 14}, 'total_msg 14'),
      ({**good, 'validation_rate': 1}, 'validation_rate'),
      ({**good, 'input_format': 'xml'}, 'input_format'),
      ({**good, 'ranges': {'0': [9, 3]}, 'total_msg': None}, 'intervals'),
      ({**good, 'runner': 'spark'}, 'runner'),
      ({k: v for k, v in good.items() if k != 'deployment_id'},
       'deployment_id')):
    with pytest.raises(control.InvalidControl, match=reason):
      control.check(bad)
