"""Networks. Model code never imports training, I/O or CLI code."""
