"""Shape inference: procedural object datasets, Chamfer distances, grasp and partial-cloud simulators,
and the point-cloud VAE prior.

Modules are imported explicitly (`from mace_ros.core.shape.simulators import GraspDomain`): `datasets`
needs trimesh (the `sim` extra), which the engine itself does not.
"""
