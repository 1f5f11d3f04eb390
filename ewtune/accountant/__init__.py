"""Privacy maths and records shared by the agent and the coordinator.

Pure Python plus numpy/scipy/dp-accounting/cryptography: this package imports neither torch nor flwr.
"""
