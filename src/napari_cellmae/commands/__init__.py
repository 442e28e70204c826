"""Subcommands of ``cellmae`` (see :mod:`napari_cellmae.cli`)."""
