"""Task-specific pieces: batches, metrics, augmentation."""
