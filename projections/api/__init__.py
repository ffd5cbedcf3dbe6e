"""The HTTP API: reads projections, publishes commands, never writes read models itself."""
