"""fastguide CLI subcommands (one module each)."""
