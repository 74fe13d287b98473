"""The ``medseg`` subcommands, one module per group; :mod:`medseg.cli` assembles them."""
