"""The cost model behind `python -m pipeline plan`: how long and how much a run takes on a cluster."""
