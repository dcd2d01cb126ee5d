"""Benchmarks (installed as ``tbrun_bench``): latency against dense offload and dense on-GPU,
the CPU path's overhead against transformers, and the random-weight architectures they run.

Reports are written next to the code with the machine, command and commit that made them.
"""
