"""Generation (Lad phase 3): planning each volume, sampling, decoding and writing a synthetic dataset."""
