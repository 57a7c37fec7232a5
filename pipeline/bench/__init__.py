"""Benchmarks (not tests): step throughput, scaling, dataset memory, streamed image folders, node start-up."""
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]   # the checkout this package runs from: its DAG files, its params/
