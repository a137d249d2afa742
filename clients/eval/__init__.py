"""Efficacy evaluation of steering features: text scorers, the eval harness, statistics and reports."""
