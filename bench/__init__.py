"""Benchmarks and benchmark data (not timed tests): Q/K generators in bench.qkdata, the index benchmark in
bench.index_bench."""
