"""Core: what every layer shares and nothing depends on below it: errors, the one coercer, safe file writes, the Method interface and registry."""
