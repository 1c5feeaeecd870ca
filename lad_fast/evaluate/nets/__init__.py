"""Pretrained 3D feature networks for the fidelity metrics (MedicalNet, RadImageNet)."""
