"""Data: readers, geometry, layouts, label vocabularies, phantoms and prepared datasets."""
