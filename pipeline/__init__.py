"""Command line of the diffusion feature cache: `pipeline --help`."""
