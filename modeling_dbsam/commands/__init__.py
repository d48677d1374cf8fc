"""Subcommands of the ``dbsam`` CLI, discovered by :mod:`modeling_dbsam.cli`."""
