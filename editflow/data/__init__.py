"""Data: toy edit generator, WebDataset shards, loaders."""
