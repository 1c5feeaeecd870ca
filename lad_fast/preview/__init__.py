"""PNG previews of volumes and masks, and the inputs behind the preview command."""
