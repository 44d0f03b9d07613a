"""The training side: models, loss, data, evaluation and model files."""
