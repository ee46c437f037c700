"""dpo_ds: Diffusion-DPO for large diffusion models on DeepSpeed.

Kept free of heavy imports: `import dpo_ds.losses` needs neither deepspeed
nor diffusers.
"""

__version__ = "0.1.0"
