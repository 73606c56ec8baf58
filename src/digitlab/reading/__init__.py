"""Reading digits with a trained model: checkpoints, evaluation on the test set, calibrated
confidence, and pictures of your own (decoding, finding the digits, reading them)."""
