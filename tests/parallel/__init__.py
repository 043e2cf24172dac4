"""Multi-process tests. Named distributed/, not dist/: pytest does not recurse into directories called dist."""
