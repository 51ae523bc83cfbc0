"""Distributed training: mesh and partition rules, precision, optimizer, losses, train step."""
