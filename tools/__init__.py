"""Programs around the pipelines: the replayer, the report, ``make demo``.

They import the pipelines and the building blocks, never the reverse.
"""
