"""outrider inside the training frameworks people already use.

Each module imports its framework only when it is used, so ``import probe``
stays free of torch and of every framework.
"""
