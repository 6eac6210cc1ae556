"""The report: summaries and plots of training runs (python -m report DIR...)."""
