"""Planning: request groups, waiting-time estimates, policies, the stochastic program, plans."""
