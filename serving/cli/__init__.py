"""The command line: ``sim <command>`` / ``python -m serving <command>`` and the batch commands
``predict``, ``label`` and ``info``. Each command's module is imported only when it runs."""
