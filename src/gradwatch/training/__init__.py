"""Training: data, models, the LightningModule, and the pipeline that runs one fit."""
