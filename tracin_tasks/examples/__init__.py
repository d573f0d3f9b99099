"""Real, offline example data and models: scikit-learn's digits with recorded label noise."""
