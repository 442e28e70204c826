"""napari contributions that need no widget: the plate reader and the sample data."""
