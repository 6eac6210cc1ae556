"""rig: the test rig - a real S3-compatible server on loopback and a network/fault proxy in front of it.

Used by the tests, `make bench`, `make compare` and `make s3-up`; never imported by the product packages
(`feedrate`, `shardgen`, `loaders`, `training`, `report`, `train.py`). It needs requirements-dev.txt
(`moto[server]`).
"""
