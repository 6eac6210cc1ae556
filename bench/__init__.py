"""make bench: loader-only throughput of every variant (see bench.__main__)."""
