"""Dataflow: the job a pipeline would submit, built offline.

``--runner dataflow --dry_run`` (see ``runners.options``) selects
``OfflineDataflowRunner``: Beam's own ``DataflowRunner`` translates the
pipeline exactly as for a real submission (overrides, Runner v2 portable
graph, Docker environments, staged packages) but, with Beam's ``dry_run``
test option, stops before any credentials, GCS upload or Dataflow API call.
We then write what the service would have received:

* ``<job file>``: the ``projects.locations.jobs.create`` body (``Job`` JSON:
  type, environment, worker pool, SDK image, pipeline options). On Runner v2
  it has no ``steps``: the graph travels as the staged pipeline proto.
* ``<job file minus .json>.pipeline.json``: that pipeline proto (the graph:
  every transform's unique name, coders, environments) as JSON.

Beam's ``--dataflow_job_file`` alone is not enough offline: Beam writes it
only after staging artifacts to GCS, just before submitting.

    python -m pipelines.serve ... --runner dataflow --project P \\
        --region us-central1 --temp_location gs://BUCKET/tmp --dry_run

The flex template for a real launch (``Dockerfile``, ``metadata.json``) sits
next to this file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any, Optional

from apache_beam.options.pipeline_options import (DebugOptions,
                                                  GoogleCloudOptions,
                                                  TestOptions)
from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner
from apache_beam.runners.runner import PipelineResult, PipelineState

_LOGGER = logging.getLogger(__name__)


class OfflineDataflowResult(PipelineResult):
  """A finished dry run: the job that would have been submitted."""

  def __init__(self, job, job_file: str, pipeline_file: str):
    super().__init__(PipelineState.DONE)
    self.job = job
    self.job_file = job_file
    self.pipeline_file = pipeline_file

  def wait_until_finish(self, duration=None):
    return self.state

  def step_names(self) -> set[str]:
    """Unique names of the pipeline's transforms (the Dataflow steps)."""
    return {t.unique_name for t in
            self.job.proto_pipeline.components.transforms.values()}


class OfflineDataflowRunner(DataflowRunner):
  """``DataflowRunner`` that writes the job files instead of submitting."""

  def run_pipeline(self, pipeline, options, pipeline_proto=None):
    # Import here like DataflowRunner does: only [gcp] installs have it.
    from apache_beam.runners.dataflow.internal import apiclient
    options.view_as(TestOptions).dry_run = True
    result = super().run_pipeline(pipeline, options, pipeline_proto)
    job = result.job
    cloud = options.view_as(GoogleCloudOptions)
    # What DataflowApplicationClient.create_job_description does, minus the
    # uploads: container image overrides, then the job environment.
    apiclient.DataflowApplicationClient._apply_sdk_environment_overrides(
        job.proto_pipeline, {}, options)
    serialized = job.proto_pipeline.SerializeToString()
    staged_url = f'{cloud.staging_location}/pipeline.pb'
    job.proto.environment = apiclient.Environment(
        packages=_would_stage(job.proto_pipeline),
        options=options,
        environment_version=apiclient._FNAPI_ENVIRONMENT_MAJOR_VERSION,
        proto_pipeline_staged_url=staged_url,
        proto_pipeline=job.proto_pipeline,
        pipeline_proto_hash=hashlib.sha256(serialized).hexdigest()).proto

    job_file = options.view_as(DebugOptions).dataflow_job_file
    if not job_file:
      raise ValueError('OfflineDataflowRunner needs --dataflow_job_file')
    pipeline_file = os.path.splitext(job_file)[0] + '.pipeline.json'
    os.makedirs(os.path.dirname(os.path.abspath(job_file)), exist_ok=True)
    job_json, literal_secrets = _redact(json.loads(job.json()))
    if literal_secrets:
      # The pickled transforms in the graph carry them too: only a
      # reference keeps a secret out of a job.
      _LOGGER.warning(
          'Kafka secrets given in plain text (%s): redacted in %s, but the '
          'job graph still carries them; pass "env:NAME" or "file:/path" '
          'instead (resolved on the workers)', ', '.join(literal_secrets),
          job_file)
    with open(job_file, 'w') as f:
      json.dump(job_json, f, indent=2)
    from google.protobuf import json_format
    with open(pipeline_file, 'w') as f:
      f.write(json_format.MessageToJson(job.proto_pipeline))
    _LOGGER.info('Dataflow job written to %s (graph: %s); nothing submitted.',
                 job_file, pipeline_file)
    print(f'[dataflow] dry run: job {job_file}, graph {pipeline_file}',
          flush=True)
    return OfflineDataflowResult(job, job_file, pipeline_file)


# Kafka client settings whose values are secrets (kafka-python names).
_SECRET_KEYS = frozenset({'sasl_plain_password', 'ssl_password',
                          'sasl_oauth_token', 'ssl_keyfile_password'})


def _redact(value: Any, found: Optional[list] = None) -> tuple[Any, list]:
  """``value`` with literal Kafka secrets as ``***`` (options may hold
  them as dicts or as JSON text); the keys found."""
  found = [] if found is None else found
  if isinstance(value, dict):
    out = {}
    for key, item in value.items():
      if key in _SECRET_KEYS and isinstance(item, str) and not item.startswith(
          ('env:', 'file:', '***')):
        found.append(key)
        out[key] = '***'
      else:
        out[key] = _redact(item, found)[0]
    return out, found
  if isinstance(value, list):
    return [_redact(item, found)[0] for item in value], found
  if isinstance(value, str) and any(k in value for k in _SECRET_KEYS):
    # Options appear as JSON text or as a Python repr (display data).
    def hide(match):
      if match.group(3).startswith(('env:', 'file:', '***')):
        return match.group(0)
      found.append(match.group(2))
      return f'{match.group(1)}***{match.group(4)}'
    return _SECRET_PATTERN.sub(hide, value), found
  return value, found


_SECRET_PATTERN = re.compile(
    r"""(["'](%s)["']\s*:\s*["'])([^"']*)(["'])""" % '|'.join(
        sorted(_SECRET_KEYS)))


def _would_stage(proto_pipeline) -> list[str]:
  """Names of the artifacts the job would stage (nothing is uploaded)."""
  from apache_beam.portability import common_urns
  from apache_beam.portability.api import beam_runner_api_pb2
  names: list[str] = []
  for env in proto_pipeline.components.environments.values():
    for dep in env.dependencies:
      if dep.role_urn == common_urns.artifact_roles.STAGING_TO.urn:
        name = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(
            dep.role_payload).staged_name
      elif dep.type_urn == common_urns.artifact_types.FILE.urn:
        name = os.path.basename(beam_runner_api_pb2.ArtifactFilePayload
                                .FromString(dep.type_payload).path)
      else:
        continue
      if name not in names:
        names.append(name)
  return names


def load_job(job_file: str) -> dict[str, Any]:
  """Reads a written job and its graph: ``{'job': ..., 'pipeline': ...}``."""
  with open(job_file) as f:
    job = json.load(f)
  with open(os.path.splitext(job_file)[0] + '.pipeline.json') as f:
    return {'job': job, 'pipeline': json.load(f)}
