"""Procedural abdominal CT phantoms: the embedded default data, drawn locally from a seed."""
