"""What a study gives out: its report and plots, the progress line of a search, and the best models logged and
exported (searchlab.report.models, imported from its module: it loads Lightning)."""

from searchlab.report.report import (
    Report,
    Section,
    best_overrides,
    check_settings,
    render_text,
    report_folder,
    with_trial,
    write_report,
)

__all__ = ["Report", "Section", "best_overrides", "check_settings", "render_text", "report_folder", "with_trial",
           "write_report"]
