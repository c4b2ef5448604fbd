"""``attnlab compare``: the whole model family trained on one corpus under one budget, scored the
same way, and written up as report.md + report.html (see :mod:`attnlab.compare.layout` for the folder)."""

from attnlab.compare.report import write_report
from attnlab.compare.run import (
    DEFAULT_MODELS,
    GPT_MODELS,
    LABELS,
    MODELS,
    PRESETS,
    CompareConfig,
    compare,
    gpt_config,
    parse_budget,
)

__all__ = ["CompareConfig", "compare", "gpt_config", "parse_budget", "write_report", "MODELS", "DEFAULT_MODELS", "GPT_MODELS",
           "LABELS", "PRESETS"]
