"""Training loops: shared utilities and one module per trained model."""
