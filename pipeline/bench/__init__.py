"""Benchmarks (not tests): step throughput, scaling, dataset memory, node start-up."""
