"""one-pipeline: ONE knowledge distillation, from training to a deployable branch."""

__version__ = "0.1.0"
