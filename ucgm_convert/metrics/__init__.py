"""Sample-quality metrics: Frechet distances, Inception Score and the feature networks they use."""
