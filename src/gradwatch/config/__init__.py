"""Config: the command-line pre-check, config errors, resolvers, and config -> objects (`build`)."""
