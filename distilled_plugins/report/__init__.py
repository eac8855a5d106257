"""The distillation report of one run: one self-contained HTML page built from the stages' artifacts.

Usage:
    python -m distilled_plugins.report --run-dir {output_root}/distill_r1/{run_id}
    # writes {run_dir}/report/report.html (or --dst), charts inlined as SVG: mail it, archive it

Nothing is recomputed from scratch: the figures are those of the stages' stats files (generate's shards, merge,
reject_sampling, handle, pack), the fine-tune job's ``metrics.json`` and the evaluation's ``report.json``. Two
tables take one streaming pass over the merged generations and the filtered rows (acceptance by level /
subject / source, and the teacher's completion lengths from each response's usage): the only per-row data no
stats file holds. A run in progress gets the sections of the stages that have finished; the others say what is
missing. MATH-500 is compared with the previous run beside this one (same ``{output_root}/distill_r1/``) that
has an evaluation report written before this run's, or with ``--previous``.

Modules: :mod:`.config` (:class:`ReportConfig`), :mod:`.collect` (``collect``: the figures, a dict, the same numbers
the page shows), :mod:`.rows` (the per-row pass and its cache), :mod:`.charts` (matplotlib, as SVG), :mod:`.render`
(``render``: the HTML, each table cell tagged ``data-figure="<section>.<name>"``), :mod:`.approval` (the figures
the approval gate shows), :mod:`.stage` (``run``: writes the file). The Airflow plugin
(``operators/report_plugin.py``) serves ``render`` of ``collect`` for a run's *Report* tab. Where each artifact lies
in the run folder is ``core.schema``'s.
"""

from distilled_plugins.report.config import ReportConfig

__all__ = ["ReportConfig"]
