"""Serving trained models: schemas, the model cache, sliced model math, the service."""
