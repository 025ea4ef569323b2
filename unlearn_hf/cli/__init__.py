"""The ``unlearn-hf`` command line."""
