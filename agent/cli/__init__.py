"""The ``outrider`` command line and the ``outrider run`` launcher."""
