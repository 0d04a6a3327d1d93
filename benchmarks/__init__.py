"""The benchmark suite: opendelta side by side with PEFT, full fine-tuning and the bare backbone.

Run ``python -m benchmarks`` (``--smoke`` for a tiny run, ``--device cuda``, ``--json PATH``).
Every figure is a ratio of configurations measured in one process, interleaved round by round.
"""
