"""Benchmarks (not tests): step throughput, scaling, dataset memory, streamed image folders, node start-up."""
