"""The shipped problems: each module declares one ``PROBLEM``.

``--problem taxi`` loads ``problems.taxi``; a problem of your own can live in
any file (``--problem path/to/mine.py``): see ``transforms.problem``.
"""
