"""The library's command line: ``python -m serving <command>`` (the dispatcher that ``sim``
shares) and the commands ``predict``, ``label`` and ``info``. Each command's module is imported
only when it runs."""
