"""napari docks: the Stain widget and the Fine-tune widget.

The widget modules are imported by npe2 on demand (see ``napari.yaml``); this package itself stays
empty so importing one dock never pulls in the other.
"""
