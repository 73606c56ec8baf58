"""Studies of many runs: the chapter's side-by-side experiment, sweeps, and the model summary."""
