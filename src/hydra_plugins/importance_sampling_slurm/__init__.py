"""The project's Hydra launcher for SLURM (hydra/launcher=slurm); see slurm_launcher.py."""
