"""The central experiment, one command: ``rlvr compare`` plans the arms x seeds of a compare config and runs
them (``compare.py``), with the starting policies of an upcycling compare built once per construction seed
(``starting_policies.py``); the report it ends with lives in :mod:`rlvr.report`. May import the run recipe
(:mod:`rlvr.run`), the report and everything below them; only the command line imports it.
"""
