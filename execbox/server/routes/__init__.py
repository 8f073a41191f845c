"""One module per resource: execute (sync and streamed), executions (async jobs), health."""
