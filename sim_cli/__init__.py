"""The ``sim`` command: the product's front door, above every package (see :mod:`sim_cli.main`)."""
