"""Shared building blocks of the model files. Imports nothing from engine/ or models/."""
