"""MONAI Label infer tasks."""
