"""Command line: the sub-commands of ``python -m benchmark`` that are not owned by a layer's own module."""
