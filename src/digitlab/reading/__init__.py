"""Reading pictures of your own with a trained model: decoding them, finding the digits, reading them."""
