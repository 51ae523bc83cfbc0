"""Few-shot evaluation (docs/design.md §2): imports `inference` and `data`."""
