"""Qt / napari front end. Only this package (and ``_napari``) imports qtpy, magicgui or napari."""
