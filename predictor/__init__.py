"""Routing-path predictors (issue 5): forecast the experts of the next MoE layers so loads overlap compute."""
