"""Few-shot evaluation (DESIGN.md §2): imports `inference` and `data`."""
