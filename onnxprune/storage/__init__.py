"""Load and save: models in and out (external data, > 2 GB, atomic writes), safely."""
