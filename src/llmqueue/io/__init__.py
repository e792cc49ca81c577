"""Files and formats: config files and tables, atomic writes, the results store, plotting."""
