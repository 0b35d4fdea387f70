"""The failure suite: small CPU trainers that break on purpose under a real agent.

``trainers`` holds the model families and the training loop (run as
``python -P -m bench.failures.trainers``), ``injections`` the failures it can
inject at a known step, ``scenarios`` the catalogue and which rule should
catch what, ``runner`` runs scenarios under ``outrider run`` and reads back
their alerts, ``report`` scores them and prints the table.
"""
