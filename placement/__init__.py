"""Expert placement (issue 6): affinity statistics from traces, integer programs, placement plans."""
