"""One module per command of `pipeline`; `pipeline.cli.COMMANDS` names them and imports each only when it runs.

A command module wires its options to `stages/` and imports the stage code inside the command, so that
importing it (for `--help`) stays light and a DVC stage depends only on its own command's module.
"""
