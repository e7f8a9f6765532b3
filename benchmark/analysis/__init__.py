"""Analysis: curves, figures, tables and the results page, built from the tidy CSVs only."""
