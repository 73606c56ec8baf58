"""Training a model: the loop and its steps, reporters, optimisers, augmentation, and the run
folder around it (saving, resuming, stopping, many processes)."""
