"""Packaging for rtml: real-time ML on Kafka streams with Apache Beam.

Every version the project depends on is pinned here and only here. The same
file is Beam's ``--setup_file`` for remote workers (Dataflow, Flink PROCESS
workers), so the packages ``pipelines``, ``transforms``, ``models`` and
``runners`` reach the workers without ``save_main_session``.
"""

import setuptools

BEAM_VERSION = '2.77.0'

REQUIRED = [
    f'apache-beam[gcp]=={BEAM_VERSION}',
    'tensorflow==2.21.0',
    'tf_keras==2.21.0',
    'tensorflow-transform==1.21.0',
    'tfx-bsl==1.21.0',
    'kafka-python==3.0.12',
    # kafka-python checks every record batch with CRC-32C: in pure Python
    # without this C implementation.
    'crc32c==2.7.1',
]

EXTRAS = {
    # nbclient + ipykernel execute the notebook; import-linter checks layers;
    # xdist runs the suite on two processes (make test).
    'test': ['pytest==9.2.0', 'pytest-timeout==2.4.0', 'pytest-xdist==3.8.0',
             'nbclient==0.11.0',
             'nbformat==5.11.1', 'ipykernel==7.4.0', 'import-linter==2.17'],
    # Reports and benchmarks: plots and the gradient-boosted-trees baseline.
    'report': ['matplotlib==3.11.2', 'pandas==2.3.3'],
    'bench': ['scikit-learn==1.9.1', 'psutil==7.2.2'],
}

setuptools.setup(
    name='rtml',
    version='0.1.0',
    description='Real-time ML on Kafka streams with Apache Beam and tf.Transform',
    python_requires='>=3.10,<3.13',
    packages=setuptools.find_packages(
        include=['pipelines*', 'transforms*', 'models*', 'runners*',
                 'problems*', 'tools*']),
    package_data={'runners': ['*/pom.xml', '*/*.properties', '*/*.java',
                             'dataflow/*']},
    install_requires=REQUIRED,
    extras_require=EXTRAS,
)
