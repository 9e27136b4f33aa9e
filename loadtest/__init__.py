"""Load test of a served library: Locust drives a load shape, an observer samples replicas.

`python -m loadtest` (or `make loadtest`) serves a library, runs the short profile and writes
`loadtest/results/latest/`; see `loadtest/run.py`.
"""
