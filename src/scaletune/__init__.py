"""scaletune: parameter-efficient fine-tuning with one run config from a laptop CPU to a Slurm cluster."""

__version__ = "0.1.0"
