"""Datasets, splits and the train/evaluate loops that every pass shares."""
