"""Offline side of TRAIL: datasets, training examples built with stream.trends, baselines, evaluation."""
