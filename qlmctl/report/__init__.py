"""Reports on run logs: metrics, comparisons, exports (table/JSON/CSV), plots and HTML.

``runs.build_report`` loads run directories and computes everything; ``export.render``
prints it; ``plots.write_plots`` writes PNGs and a self-contained HTML page.
"""
