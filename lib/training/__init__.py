"""Learning from labels: recipes, data, the simulated-annotator iteration, the one training loop, losses, metrics,
the paper's evaluation protocol and label curation."""
