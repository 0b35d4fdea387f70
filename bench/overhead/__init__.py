"""The parts of ``bench/bench_overhead.py``, the training-slowdown benchmark.

``variants`` names what is compared, ``placement`` puts trainer and agent on
their cores, ``telemetry`` and its backends (``outrider_telemetry``,
``wandb_telemetry``, ``tensorboard_telemetry``) are what a monitored run adds
to the training loop, ``worker`` is one training run in its own process,
``counters`` the CPU and kernel figures it reads around its timed loop,
``runner`` starts the agent and a worker per run, and ``report`` prints the
tables.
"""
