"""Benchmarks for tf_bf16 (not part of ``make test``): each prints JSON lines with ratios measured in one run.

``python -m bench.models`` times FP32, TensorFlow's AMP and tf_bf16 on real models;
``python -m bench.convert_speed`` measures conversion throughput; ``python -m bench.op_profile``
splits run time per op type from RunMetadata step stats. See ``bench/README.md``.
"""
