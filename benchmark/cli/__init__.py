"""Command line: every sub-command of ``python -m benchmark`` (the one table of them: ``commands``), flags in, one call below, text out."""
