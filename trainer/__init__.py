"""Offline side of TRAIL: datasets, training examples built with stream.core.trends, baselines, evaluation."""
