"""Sub-commands of the ``opendelta`` CLI, one module each (register + run)."""
