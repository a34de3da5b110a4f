"""The report of a compare, read from the run directories alone (no torch, transformers or TRL): the runs as
written (``runs.py``), bootstrap intervals and verdicts (``intervals.py``), the summary table and the report's
assembly (``summary.py``), its sections on routing and mismatch (``sections.py``), selective rollouts
(``prompts.py``) and adapters (``adapters.py``), shared cells (``cells.py``) and the figures (``figures.py``).
May import only :mod:`rlvr.utils`; the experiment and the command line import it.
"""

from rlvr.report.summary import STARTS_INSIDE, summary_lines, summary_rows, verdict_lines, write_report

__all__ = ["STARTS_INSIDE", "summary_lines", "summary_rows", "verdict_lines", "write_report"]
