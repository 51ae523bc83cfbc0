"""Input side: the batch schema (docs/design.md §4); TFDS builders and pipelines land here."""
