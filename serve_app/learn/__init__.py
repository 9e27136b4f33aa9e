"""The offline path: profile experts, train the router, evaluate it, draw the Pareto front."""
