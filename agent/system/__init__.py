"""The system room: the agent samples the machine it runs on.

``sampler.py`` is the thread that composes a sample and emits it;
``host.py`` (CPU, memory, disk, network), ``processes.py`` (the trainers and
their workers) and ``nvml.py`` (the GPUs) each write their part of it.
"""
