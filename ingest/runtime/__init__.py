"""The runtime: probe discovery and loading, map reading, deltas, histograms, cardinality, the agent."""
