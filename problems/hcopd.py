"""HCOPD: COPD or healthy? (binary) Kafka-ML's own validation example.

The 239-row, 4-column extract of the Exasens data that Kafka-ML streams in
Avro to train and serve its HCOPD model (``data/README.md``): diagnosis
(1 = COPD, 0 = healthy control), gender, age, smoking. No event time and no
id: streamed rows take their Kafka timestamp and key.

Data: ``data/hcopd.csv``.
"""

from transforms.problem import (Aggregate, DType, Feature, Kind, Label, Op,
                                Problem, Task)

PROBLEM = Problem(
    name='hcopd',
    features=(
        Feature('Gender', Kind.IDENTITY, DType.INT, required=True,
                domain=(0, 1)),
        Feature('Age', Kind.NUMERIC, DType.FLOAT, required=True),
        # 1 non-smoker, 2 ex-smoker, 3 active smoker.
        Feature('Smoking', Kind.IDENTITY, DType.INT, required=True,
                domain=(1, 3)),
        Feature('Diagnosis', Kind.LABEL, DType.INT, required=True),
    ),
    label=Label(Task.BINARY, 'Diagnosis'),
    entity_key='Smoking',
    aggregates=(Aggregate('Age', (Op.MEAN, Op.MIN, Op.MAX)),),
    hparams={'epochs': 60, 'batch_size': 16, 'hidden_units': (16, 8),
             'dropout': 0.1},
    data='data/hcopd.csv',
)
