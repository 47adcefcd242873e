"""scaletune: parameter-efficient fine-tuning with one run config from a laptop CPU to a Slurm cluster.

From Python: `from scaletune import api`, then api.train / evaluate / predict / merge (see scaletune.api)."""

__version__ = "0.1.0"
