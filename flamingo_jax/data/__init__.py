"""Input side: the batch schema (DESIGN.md §4); TFDS builders and pipelines land here."""
