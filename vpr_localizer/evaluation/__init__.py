"""Evaluation: recall@N and errors, real-data scenarios, plots and result tables."""
