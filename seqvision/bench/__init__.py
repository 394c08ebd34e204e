"""Benchmarks as a library: what ``seqvision bench`` runs and the scripts in ``benchmarks/`` import.

- ``measure``: fresh-process peak memory (RSS on the CPU) and timing helpers, markdown tables,
  atomic CSV and figure files.
- ``models``: throughput, peak memory and operation counts of vision backbones against a peer model
  by image size, batch and mode (``seqvision bench models``, ``benchmarks/resolution_scaling.py``).
- ``kernels``: every form of the sequence operators on the CPU, the Triton kernels on CUDA
  (``seqvision bench kernels``, ``benchmarks/kernels_cpu.py``, ``benchmarks/kernels_gpu.py``).
- ``digits``: an accuracy comparison on scikit-learn's digits (``seqvision bench digits``).

Nothing is imported here, so that importing one module does not pull in the others' dependencies.
"""
