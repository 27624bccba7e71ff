"""Summary: a run's outcome, the sweep table, the report, and the Hydra sweep callback."""
