"""make bench / make compare: loader-only throughput of every variant (`python -m bench`), and train.py
over several variants then the report (`python -m bench.compare`). A tool beside the product packages: it
may use the test rig (rig/) to start the local S3 endpoint."""
