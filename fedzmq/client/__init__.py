"""The coordinator's side: connections to workers, and pointers to the objects they hold."""
