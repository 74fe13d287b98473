"""Frozen, validated configs: data specs (``data_specs/*.yaml``) and pipelines (``pipelines/*.yaml``)."""
