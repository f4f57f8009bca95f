"""Exasens saliva samples: COPD, asthma, infected or healthy? (multi-class)

The UCI Exasens data (399 subjects), the full file behind Kafka-ML's HCOPD
example (``data/README.md``; cite P. S. Zarrin et al., Annals of Biomedical
Engineering 2020). The file has three header lines and four legend columns,
so the columns are named here. Only 100 subjects have the dielectric
measurements; the others get 0, far outside the measured range, which the
model can tell apart. No event time: streamed samples take their Kafka
timestamp.

Data: ``data/exasens.csv``.
"""

from transforms.problem import (Aggregate, CsvFormat, DType, Feature, Kind,
                                Label, Op, Problem, Task)

MEASUREMENTS = ('imaginary_min', 'imaginary_avg', 'real_min', 'real_avg')

PROBLEM = Problem(
    name='exasens',
    features=tuple(
        Feature(name, Kind.NUMERIC, DType.FLOAT, default=0.0)
        for name in MEASUREMENTS) + (
        Feature('gender', Kind.IDENTITY, DType.INT, required=True,
                domain=(0, 1)),
        Feature('age', Kind.NUMERIC, DType.FLOAT, required=True),
        # 1 non-smoker, 2 ex-smoker, 3 active smoker.
        Feature('smoking', Kind.IDENTITY, DType.INT, required=True,
                domain=(1, 3)),
        Feature('diagnosis', Kind.LABEL, DType.STRING, required=True),
    ),
    label=Label(Task.MULTICLASS, 'diagnosis',
                classes=('COPD', 'HC', 'Asthma', 'Infected')),
    event_id='id',
    entity_key='smoking',
    aggregates=(Aggregate('age', (Op.MEAN, Op.MIN, Op.MAX)),),
    csv=CsvFormat(
        columns=('diagnosis', 'id') + MEASUREMENTS + (
            'gender', 'age', 'smoking', 'legend_1', 'legend_2', 'legend_3',
            'legend_4'),
        skip_lines=3),
    hparams={'epochs': 60, 'batch_size': 32, 'hidden_units': (32, 16),
             'dropout': 0.2},
    data='data/exasens.csv',
)
