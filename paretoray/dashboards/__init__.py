"""Reports people look at: a sweep's Pareto fronts, front table, parameter effects and importances,
speculative-decoding curves and needle-in-a-haystack maps, in one offline HTML page.

`paretoray report NAME [NAME ...] -o FILE.html` writes one; the controller logs the same page as
`report.html` on each sweep's parent run, where the MLflow UI's artifact view shows it.
"""

from paretoray.dashboards.data import ReportError
from paretoray.dashboards.report import REPORT_FILE, live_report_html, report_html, write_report

__all__ = ["REPORT_FILE", "ReportError", "live_report_html", "report_html", "write_report"]
